"""Using a fine-tune: load base + adapter or a merged model, generate and stream, evaluate held-out
loss, INT8 for CPU inference, merge adapters.
"""
