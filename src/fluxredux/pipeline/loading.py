"""Loading the model the settings ask for: the one entry to the real model.

Torch-free to import: ``load_model`` first binds transformers' image processor names to
their PIL classes (see ``use_pil_image_processors``), then imports the modules that import
diffusers. Doing it here, when a model is loaded, keeps the fix-up out of import side effects.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fluxredux.config import Offload, Settings
from fluxredux.errors import ModelUnavailable

if TYPE_CHECKING:
    import torch

    from fluxredux.pipeline.redux_model import ReduxModel
    from fluxredux.pipeline.speed import Tuning

log = logging.getLogger(__name__)

ModelKind = Literal["flux", "demo"]


def use_pil_image_processors() -> None:
    """Bind transformers' CLIP and SigLIP image processor names to their PIL classes.

    Since transformers 5 those names mean the torchvision backend; without torchvision
    (fluxredux does not need it), looking either name up falls back to the ``...Pil``
    class with a warning. diffusers' Flux pipelines look both up when they are imported,
    so every model load printed two warnings about a package nobody has to install. The
    loader uses ``SiglipImageProcessorPil`` itself; binding the names to the PIL classes
    beforehand is exactly transformers' fallback, without the noise.
    """
    import transformers

    if importlib.util.find_spec("torchvision") is not None:
        return  # the default backend is there: nothing falls back, nothing warns
    names = ("CLIPImageProcessor", "SiglipImageProcessor")
    pil_classes = {name: getattr(transformers, f"{name}Pil") for name in names}
    # Resolving a lazy name may replace the module object in sys.modules: bind the names on
    # the one that later imports will find.
    module = sys.modules["transformers"]
    for name, cls in pil_classes.items():
        setattr(module, name, cls)


def choose_model_kind(choice: str, cuda_available: bool) -> ModelKind:
    if choice == "auto":
        return "flux" if cuda_available else "demo"
    if choice in ("flux", "demo"):
        return choice  # type: ignore[return-value]
    raise ModelUnavailable(f"unknown model choice {choice!r}; use auto, flux or demo")


def load_model(settings: Settings) -> ReduxModel:
    """Load the model the settings ask for, saying loudly which one it is."""
    use_pil_image_processors()  # before anything below imports diffusers
    import torch

    from fluxredux.pipeline.adapters import AdapterBudget
    from fluxredux.pipeline.conditioning_cache import ConditioningCache
    from fluxredux.pipeline.demo import ensure_demo_model
    from fluxredux.pipeline.redux_model import ReduxModel
    from fluxredux.pipeline.speed import Tuning

    cuda = torch.cuda.is_available()
    kind = choose_model_kind(settings.model, cuda)
    device = torch.device(settings.device or ("cuda" if cuda else "cpu"))
    if kind == "demo":
        paths = ensure_demo_model(settings.cache_dir)
        schnell_ref, redux_ref = str(paths.schnell), str(paths.redux)
        why = "no CUDA GPU found" if settings.model == "auto" else "--model demo"
        # Info, not a warning: whoever runs the model (serve's supervisor, `fluxredux worker`,
        # predict's output) says "demo model: random weights, outputs are noise" once per
        # start; this line comes again at every load (a worker restart).
        log.info("loading the DEMO model (%s): random weights, outputs are noise", why)
        preview_ref = demo_previews(settings.cache_dir)
    else:
        schnell_ref, redux_ref = settings.schnell_model, settings.redux_model
        preview_ref = settings.preview_model
    tuning, offload, profile = Tuning.from_settings(settings), settings.offload, ""
    if kind == "flux" and device.type == "cuda" and settings.memory_profile != "manual":
        tuning, offload, profile = _with_memory_profile(settings, device, tuning)
    model = ReduxModel.load(
        schnell_ref,
        redux_ref,
        kind=kind,
        device=device,
        offload=offload,
        conditioning_cache=ConditioningCache.from_megabytes(settings.conditioning_cache_mb),
        keep_text_encoders=settings.text_encoders == "keep",
        tuning=tuning,
        memory_profile=profile,
        adapter_budget=AdapterBudget(
            settings.lora_cache_count,
            settings.lora_cache_mb * 1024 * 1024,
            max_rank=settings.lora_max_rank,
            offered=adapters_offered(settings),
        ),
        preview_ref=preview_ref,
    )
    log.info("model ready: %s", model.info.describe())
    return model


def _with_memory_profile(
    settings: Settings, device: torch.device, tuning: Tuning
) -> tuple[Tuning, Offload, str]:
    """The quantize and offload of the memory profile asked for ("auto": the fastest that
    fits this GPU's free memory now; a profile's name: that one), and the line that says
    which and why (the model's description shows it: the log, /health, workers)."""
    from dataclasses import replace

    import torch

    from fluxredux.pipeline.devices import cuda_device
    from fluxredux.pipeline.memory_profiles import MemoryProfile, choose_profile, describe_choice
    from fluxredux.pipeline.speed import check_tuning

    def cannot_run(profile: MemoryProfile) -> str | None:
        """What this worker lacks for ``profile`` (a package, a combination with its other
        settings, e.g. --compile with an offload that streams): auto passes over it."""
        try:
            check_tuning(with_profile(profile), device, profile.offload)
        except ModelUnavailable as exc:
            return f"cannot run here ({exc.message})"
        return None

    def with_profile(profile: MemoryProfile) -> Tuning:
        chosen = replace(tuning, quantize=profile.quantize)
        if (
            profile.quantize == "nf4"
            and profile.offload == "model"
            and tuning.text_encoder_quantize == "none"
        ):
            # A card that needs model offload cannot hold T5 whole in bf16 (9 GiB) for a
            # prompt either: 4-bit like the transformer (2.7 GiB).
            chosen = replace(chosen, text_encoder_quantize="nf4")
        return chosen

    # This worker's GPU only: reading another's free memory would make a CUDA context there.
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        choice = choose_profile(
            cuda_device(index),
            requested=settings.memory_profile,
            conditioning_cache_mb=settings.conditioning_cache_mb,
            cannot_run=cannot_run,
        )
    except ValueError as exc:
        raise ModelUnavailable(f"--memory-profile: {exc}") from None
    line = describe_choice(choice)
    log.info("%s: %s", line, choice.reason)
    return with_profile(choice.profile), choice.profile.offload, line


def demo_previews(cache_dir: Path) -> str | None:
    """The demo's tiny TAEF1 (written on first use), or None where the cache cannot hold it:
    the demo model runs all the same, without previews."""
    from fluxredux.pipeline.demo import ensure_demo_previews

    try:
        return str(ensure_demo_previews(cache_dir))
    except OSError as exc:
        log.warning("no step previews for the demo model: %s", exc)
        return None


def adapters_offered(settings: Settings) -> bool:
    """Whether callers may name any LoRA adapter here: a file in the folder, or a hub source."""
    folder = settings.loras_dir
    return bool(settings.lora_hub_sources) or (folder.is_dir() and any(folder.glob("*.safetensors")))
