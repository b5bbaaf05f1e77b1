"""One generation from a conditioning: the denoising loop (diffusers' FluxPipeline), then
the VAE decode to pixels. Shared by a request (``ReduxModel.generate``) and the compile
warm-up (``speed.warm_up``), which must run exactly the graphs a request runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from PIL import Image

from fluxredux.pipeline.conditioning import Conditioning, TokenLayout, attention_bias


def image_tokens(pipe: FluxPipeline, width: int, height: int) -> int:
    """The transformer's image tokens for a ``width`` x ``height`` output."""
    multiple = int(pipe.vae_scale_factor) * 2
    if width % multiple or height % multiple:
        # diffusers would silently resize; the size table never needs it.
        raise ValueError(f"width and height must be multiples of {multiple}, got {width}x{height}")
    return (width // multiple) * (height // multiple)


def denoise_and_decode(
    pipe: FluxPipeline,
    conditioning: Conditioning,
    layout: TokenLayout,
    strength: float,
    *,
    width: int,
    height: int,
    num_outputs: int,
    num_inference_steps: int,
    seed: int,
    device: torch.device,
    on_step_end: Callable[[int], None] = lambda step: None,
    before_decode: Callable[[], None] = lambda: None,
    timings: dict[str, float] | None = None,
    refine: tuple[FluxImg2ImgPipeline, Image.Image, float] | None = None,
) -> list[np.ndarray]:
    """``num_outputs`` images as uint8 (H, W, 3) arrays; ``timings`` gets the seconds of
    "denoise" and "decode". ``on_step_end(step)`` runs after each step (it may raise to stop).

    ``refine``: (the img2img pipeline over ``pipe``'s components, a draft of ``width`` x
    ``height``, its strength): start from the draft instead of pure noise. diffusers'
    FluxImg2ImgPipeline does what is exact to do there: the VAE's encoding of the draft
    (sampled with the seed's generator), noised to the timestep where the strength puts it
    in the same schedule, then only the steps left after it (4 steps at 0.35: the last 2)."""
    timings = {} if timings is None else timings
    bias = attention_bias(
        layout, strength, dtype=pipe.transformer.dtype, device=device
    )  # the query's dtype: some attention kernels insist

    def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step_end(step)
        return {}

    started = time.perf_counter()
    # The generator lives on the CPU: the same seed gives the same noise on any device.
    generator = torch.Generator("cpu").manual_seed(seed)
    common: dict[str, Any] = {
        "prompt_embeds": conditioning.prompt_embeds,
        "pooled_prompt_embeds": conditioning.pooled_prompt_embeds,
        "width": width,
        "height": height,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 0.0,  # schnell is guidance-distilled
        "num_images_per_prompt": num_outputs,
        "generator": generator,
        "output_type": "latent",
        "callback_on_step_end": step_end,
        "joint_attention_kwargs": {"attention_mask": bias} if bias is not None else None,
    }
    if refine is None:
        latents = pipe(**common).images
    else:
        refiner, draft, strength = refine
        latents = refiner(image=draft, strength=strength, **common).images
    timings["denoise"] = elapsed(started, device)

    before_decode()
    started = time.perf_counter()
    images = decode(pipe, latents, width=width, height=height, device=device)
    timings["decode"] = elapsed(started, device)
    return images


def decode(
    pipe: FluxPipeline, latents: torch.Tensor, *, width: int, height: int, device: torch.device
) -> list[np.ndarray]:
    """Packed latents -> uint8 RGB arrays. Quantised on the device, where it is free."""
    vae = pipe.vae
    latents = FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(latents.to(device=device, dtype=vae.dtype), return_dict=False)[0]
    pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(one) for one in array]


def elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # honest timings: wait for queued kernels
    return time.perf_counter() - started
