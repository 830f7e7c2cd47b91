"""`cpuft serve`: an OpenAI-compatible HTTP server for a fine-tune, on FastAPI + uvicorn.

protocol.py  the request models (pydantic: every malformed request is a 4xx) and response shapes
engine.py    the one worker thread that owns the model: bounded queue, greedy batches, stops
app.py       the routes, error handlers and API-key check, wired to an engine
"""
