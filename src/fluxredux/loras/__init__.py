"""LoRA style adapters: which ones a deployment offers (``catalog``, torch-free: the API,
the CLI and the worker use it). Loading them into the model is the pipeline's
(``pipeline/adapters.py``)."""
