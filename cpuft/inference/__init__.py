"""Using a fine-tune: `loading` (resolve --model, load base + adapter or a merged model at the
precision asked for), `generate` (one reply or a stream), `evaluate` (held-out loss), `int8`
(INT8 quantisation for CPU inference), `merge` (fold adapters into the base weights).
"""
