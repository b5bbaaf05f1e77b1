"""The HTTP API (FastAPI). Never imports torch: the model lives in the worker process."""
