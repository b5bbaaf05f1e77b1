"""fluxredux: a self-hosted prediction server for FLUX.1 Redux [schnell] image variations."""

__version__ = "0.1.0"
