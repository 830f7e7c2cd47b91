"""Datasets: load rows from a file, the Hub or the bundled sample; detect and validate their
format; convert to TRL's conversational shape; order rows by length. The bundled LIMA-shaped
sample (`lima_sample.jsonl`) lives here as package data.
"""
