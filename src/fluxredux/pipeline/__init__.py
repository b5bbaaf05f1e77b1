"""The model: the only package that imports torch and diffusers.

Import its modules explicitly (``fluxredux.pipeline.model``); this file stays empty so
that naming the package costs nothing.
"""
