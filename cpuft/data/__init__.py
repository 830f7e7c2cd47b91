"""Datasets: `readers` (rows from a file, the Hub or the bundled sample, decoded and parsed),
`formats` (detect, validate and convert each row to TRL's conversational shape), `prepare`
(the two together plus the seeded train/eval split), `packing` (row order by length, and
packing that keeps samples apart), `loss_mask` (which tokens of a conversation the loss
counts). The bundled LIMA-shaped sample (`lima_sample.jsonl`) lives here as package data.
"""
