"""The single-machine engine: one SQLite file (WAL) in the data directory, shared by the
HTTP process and its worker children.

One module per seam, on the connection helper in ``database.py``. Two seams need no table
on one machine, and live here because this engine is what one machine runs: request limits
are counted in the one HTTP process (``limits.py``), and job events travel over a pipe from
each worker child (``events.py``).
"""
