"""The model: the only package that imports torch and diffusers.

Import its modules explicitly (``fluxredux.pipeline.model``). This file does one thing
first, because it must happen before any of them imports diffusers: see
``_use_pil_image_processors``.
"""

from __future__ import annotations

import importlib.util
import sys

import transformers


def _use_pil_image_processors() -> None:
    """Bind transformers' CLIP and SigLIP image processor names to their PIL classes.

    Since transformers 5 those names mean the torchvision backend; without torchvision
    (fluxredux does not need it), looking either name up falls back to the ``...Pil``
    class with a warning. diffusers' Flux pipelines look both up when they are imported,
    so every model load printed two warnings about a package nobody has to install. The
    loader uses ``SiglipImageProcessorPil`` itself; binding the names to the PIL classes
    beforehand is exactly transformers' fallback, without the noise.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return  # the default backend is there: nothing falls back, nothing warns
    names = ("CLIPImageProcessor", "SiglipImageProcessor")
    pil_classes = {name: getattr(transformers, f"{name}Pil") for name in names}
    # Resolving a lazy name may replace the module object in sys.modules: bind the names on
    # the one that later imports will find.
    module = sys.modules["transformers"]
    for name, cls in pil_classes.items():
        setattr(module, name, cls)


_use_pil_image_processors()
