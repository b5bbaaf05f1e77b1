"""Logging set-up shared by the command line and the worker process."""

from __future__ import annotations

import logging
import os

# Libraries whose INFO/WARNING chatter (HTTP requests, weight loading) hides what
# matters; shown with --verbose.
NOISY_LIBRARIES = ("httpx", "huggingface_hub", "diffusers", "transformers", "botocore", "boto3")


def quiet_libraries(verbose: bool) -> None:
    # transformers resets its logger's level when first imported; this variable is the
    # setting it reads then.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
