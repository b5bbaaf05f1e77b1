"""Choosing the attention kernel, and finding out at worker start whether it runs here.

diffusers' attention dispatcher knows many backends by name; whether one *runs* depends on
the machine (a package, a CUDA GPU, its generation) and on what we ask of it: the
collapsed zero token and ``redux_strength`` pass an additive bias, which the flash and
sage kernels refuse. diffusers checks only that a backend's package is installed, and the
rest would surface as an error on the first request; so the worker tries the chosen
backend once on a few tokens, with and without a bias, on its own device and dtype, and
knows before it takes a job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.utils import logging as diffusers_logging

from fluxredux.errors import ModelUnavailable, first_line
from fluxredux.pipeline.conditioning import key_bias

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # "auto" or a dispatcher backend
    takes_bias: bool  # whether an additive float bias works with it


def backend_names() -> list[str]:
    return [AUTO, *(backend.value for backend in AttentionBackendName)]


def choose_attention(
    transformer: FluxTransformer2DModel, name: str, *, device: torch.device, dtype: torch.dtype
) -> AttentionChoice:
    """Set ``name`` on every attention layer of ``transformer``, after checking it exists
    and runs here; ModelUnavailable naming the choices otherwise. "auto" is diffusers'
    "native": torch's scaled_dot_product_attention, which takes a bias and picks its own
    kernel (flash without one, memory-efficient or cuDNN with one, on a GPU). It is set on
    the layers explicitly even then: diffusers' default is process-wide state, which
    another model's choice (or DIFFUSERS_ATTN_BACKEND) would change."""
    if name != AUTO and name not in backend_names():
        raise ModelUnavailable(
            f"unknown attention backend {name!r}; choose one of: {', '.join(backend_names())}"
        )
    backend = AttentionBackendName.NATIVE if name == AUTO else AttentionBackendName(name)
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "attention backends are experimental", per call
    try:
        # First: diffusers' own check that the backend's package is installed (its words).
        transformer.set_attention_backend(backend.value)
    except (RuntimeError, ValueError) as exc:
        raise ModelUnavailable(f"attention backend {name!r} is not available: {first_line(exc)}") from None
    finally:
        diffusers_logging.set_verbosity(previous)
    head_dim = int(transformer.config.attention_head_dim)
    try:
        _probe(backend, bias=False, head_dim=head_dim, device=device, dtype=dtype)
    except Exception as exc:
        raise ModelUnavailable(
            f"attention backend {name!r} does not run on {device} ({str(dtype).removeprefix('torch.')}): "
            f"{first_line(exc)}; use --attention-backend auto"
        ) from None
    try:
        _probe(backend, bias=True, head_dim=head_dim, device=device, dtype=dtype)
        takes_bias = True
    except Exception as exc:
        log.info("attention backend %s does not take a bias: %s", name, first_line(exc))
        takes_bias = False
    return AttentionChoice(name, takes_bias=takes_bias)


def _probe(
    backend: AttentionBackendName,
    *,
    bias: bool,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Attention over 13 tokens (not a multiple of 8 or 16, as the real sequences are
    not: some kernels want aligned masks) of 2 heads of the model's size, as the transformer calls it
    (batch, tokens, heads, head dim), with the transformer's [1, 1, 1, keys] bias shape,
    checked against the plain softmax formula: a backend that answers something else
    does not run here."""
    generator = torch.Generator("cpu").manual_seed(0)
    q, k, v = (
        torch.randn(1, 13, 2, head_dim, generator=generator).to(device=device, dtype=dtype) for _ in range(3)
    )
    keys = torch.zeros(13, device=device, dtype=dtype)
    keys[0] = 1.0
    mask = key_bias(keys) if bias else None
    with torch.inference_mode():
        got = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * head_dim**-0.5
    if mask is not None:
        logits = logits + mask.float()
    expected = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.float())
    if not torch.allclose(got.float(), expected, atol=5e-2, rtol=5e-2):
        raise RuntimeError("its result differs from the attention formula's")
