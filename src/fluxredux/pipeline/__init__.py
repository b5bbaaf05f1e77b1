"""The model: the only package that imports torch and diffusers.

Its modules are imported explicitly, and importing this package itself does nothing. Two of
them are torch-free, for the worker and the CLI: ``protocol`` (the model contract) and
``fake`` (a model without weights, for tests and service benchmarks); ``weights`` finds the
weights and ``requirements`` the packages a model needs, both without importing torch; and
``loading.load_model`` is the one entry to the real model.
"""
