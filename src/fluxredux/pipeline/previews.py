"""Step previews: what the image will look like, decoded at each denoising step by TAEF1,
the tiny FLUX autoencoder (``AutoencoderTiny``, madebyollin/taef1, MIT, ~10 MB).

A step's preview is its x0 estimate, not the noisy latent: FLUX is a flow-matching model,
whose transformer predicts a velocity v at noise level sigma, and the clean latent it
points at is x0 = x_t - sigma * v (at the last step exactly the final latent, since the
last step goes to sigma 0). A forward hook on the transformer (PyTorch's own extension
point, registered for a previewing run only and removed after it) sees both: its input
``hidden_states`` is x_t and its ``timestep`` is sigma (FluxPipeline passes t / 1000, and
its scheduler's timesteps are sigma * 1000). A run without previews has no hook at all: the
same work, the same bytes.

The preview is small (long side at most 256 px), a JPEG, and made on the step's own
thread between two steps. The latent is averaged down before the decode to what 256 px
need (a 1 MP latent by 4: 16x fewer pixels to decode), so a preview costs a fraction of a
step (benchmarks/previews.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderTiny, FluxPipeline
from PIL import Image

log = logging.getLogger(__name__)

PREVIEW_LONG_SIDE = 256
PREVIEW_QUALITY = 70


def x0_estimate(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Flow matching's clean-latent estimate at noise level ``sigma``."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
    return x_t - sigma * velocity


class Estimates:
    """The latest x0 estimate of a run, caught by a forward hook on its transformer."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None

    def hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        x_t = kwargs.get("hidden_states", args[0] if args else None)
        sigma = kwargs.get("timestep")
        velocity = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if x_t is None or sigma is None:
            return
        self.latest = x0_estimate(x_t.float(), velocity.float(), sigma.float())


@contextlib.contextmanager
def catching_estimates(transformer: torch.nn.Module, estimates: Estimates) -> Iterator[None]:
    """Each forward of ``transformer`` inside the block leaves its x0 estimate in ``estimates``."""
    handle = transformer.register_forward_hook(estimates.hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class PreviewDecoder:
    """TAEF1, loaded once: packed FLUX latents -> a small JPEG per image of the batch."""

    def __init__(self, vae: AutoencoderTiny, vae_scale_factor: int, device: torch.device) -> None:
        self.vae = vae.to(device).eval()
        self.vae_scale_factor = vae_scale_factor
        self.device = device

    @classmethod
    def load(cls, ref: str | Path, vae_scale_factor: int, device: torch.device) -> PreviewDecoder:
        """From a local folder or a repo in the Hugging Face cache (never downloaded here:
        ``fluxredux download --previews`` fetches it); OSError when it is not there."""
        vae = AutoencoderTiny.from_pretrained(str(ref), local_files_only=True, torch_dtype=torch.float32)
        return cls(vae, vae_scale_factor, device)

    @torch.inference_mode()
    def decode_array(self, packed: torch.Tensor, width: int, height: int) -> np.ndarray:
        """The first image's preview as uint8 (h, w, 3), its long side at most 256 px."""
        latents = FluxPipeline._unpack_latents(packed[:1], height, width, self.vae_scale_factor)
        # Only 256 px are shown: the latent is averaged down first (by a power of 2, to no
        # fewer than 256 px decoded), so that a 1 MP preview decodes 16x fewer pixels.
        pool = 1
        while max(width, height) // (pool * 2) >= PREVIEW_LONG_SIDE and min(latents.shape[-2:]) >= pool * 4:
            pool *= 2
        if pool > 1:
            latents = torch.nn.functional.avg_pool2d(latents, pool)
        config = self.vae.config
        latents = latents / config.scaling_factor + config.shift_factor
        decoded = self.vae.decode(latents.to(self.device, torch.float32), return_dict=False)[0]
        pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        array = pixels[0].permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array)
        image.thumbnail((PREVIEW_LONG_SIDE, PREVIEW_LONG_SIDE), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def jpeg(self, packed: torch.Tensor, width: int, height: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.decode_array(packed, width, height)).save(out, "JPEG", quality=PREVIEW_QUALITY)
        return out.getvalue()
