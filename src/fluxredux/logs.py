"""Logging set-up shared by the command line and the worker process."""

from __future__ import annotations

import logging

# Libraries whose INFO/WARNING chatter (HTTP requests, weight loading, the "torchvision
# is not installed" notice) hides what matters; shown with --verbose.
NOISY_LIBRARIES = ("httpx", "huggingface_hub", "diffusers", "transformers")


def quiet_libraries(verbose: bool) -> None:
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
