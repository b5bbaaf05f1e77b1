"""The scale-out engine: every seam in one Redis, shared by all API nodes and workers.

``client.py`` connects and maps redis-py's errors to ``StoreUnavailable``; ``common.py``
is the base every seam shares (key prefix, clock, Lua helpers); one module per seam.
"""
