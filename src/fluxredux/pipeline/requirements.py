"""What the model needs installed, and what to say when it is not: torch-free.

torch is not a dependency of any extra (pip would pick a multi-GB CUDA build by itself):
the user installs the build for their hardware first, then the ``model`` extra. Every
place that would otherwise die with an ImportError deep inside a library (the commands
at start, the worker as it loads the model) says that in one line instead.
"""

from __future__ import annotations

import importlib
import importlib.util

from fluxredux.errors import ModelUnavailable, first_line

# The packages the real and demo models import (the fake model needs none of them).
MODEL_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors")
INSTALL_MODEL = "pip install torch first (the build for your hardware), then pip install 'fluxredux[model]'"
# The fake model's worker still runs the safety checker, which is the server extra's.
SERVER_ONLY_PACKAGES = ("nudenet", "onnxruntime", "cv2")
INSTALL_SERVER = "pip install 'fluxredux[server]'"


def needs_model_packages(model: str) -> bool:
    """Every model but the fake one (flat colours, no weights) runs on torch and diffusers."""
    return model != "fake"


def is_installed(package: str) -> bool:
    """Whether ``package`` can be found, without importing it (torch costs seconds)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or a finder that refuses it
        return False


def missing_model_packages() -> list[str]:
    return [package for package in MODEL_PACKAGES if not is_installed(package)]


def missing_packages_problem(model: str) -> str | None:
    """One line saying what to install for ``model``, or None when nothing is missing."""
    if not needs_model_packages(model):
        return None
    missing = missing_model_packages()
    if not missing:
        return None
    return (
        f"the {model} model needs {', '.join(missing)}, which this Python does not have: {INSTALL_MODEL} "
        "(or --model fake: the API without a model)"
    )


def import_torch(model: str) -> None:
    """Import torch before anything that imports it on the way: a missing or broken torch
    is then this one plain error, not a RuntimeError from transformers' lazy imports."""
    if not needs_model_packages(model):
        return
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        raise ModelUnavailable(
            f"the {model} model cannot import torch ({first_line(exc)}): {INSTALL_MODEL}"
        ) from exc


def import_problem(exc: ImportError) -> ModelUnavailable:
    """A package the worker needs at start could not be imported: what to install."""
    top = (exc.name or "").partition(".")[0]
    install = INSTALL_SERVER if top in SERVER_ONLY_PACKAGES else INSTALL_MODEL
    return ModelUnavailable(f"a package the worker needs cannot be imported ({first_line(exc)}): {install}")
