"""Offline stand-ins for the Hub: tiny random-weight models and tokenizers built locally from real
`transformers` config classes, for tests, the demo and benchmarks.
"""
