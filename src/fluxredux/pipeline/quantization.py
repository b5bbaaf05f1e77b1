"""fp8 for the transformer, through torchao's documented one-call quantisation.

Dynamic float8 activations and float8 weights, scaled per row: the transformer's linear
layers run on the GPU's fp8 tensor cores (twice bf16's peak on Ada and Hopper) and its
weights take half the memory. Only the transformer: it is where the time goes, and the
VAE and the image encoders are small and more sensitive.
"""

from __future__ import annotations

import logging

import torch

from fluxredux.config import Quantization
from fluxredux.errors import ModelUnavailable

log = logging.getLogger(__name__)

# fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)


def check_quantization(mode: Quantization, device: torch.device) -> None:
    """ModelUnavailable, said plainly, when ``mode`` cannot run on ``device``: before
    any weight is loaded, so a misconfigured worker says so in a second."""
    if mode == "none":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelUnavailable(
            f"quantize={mode} needs a CUDA GPU of compute capability "
            f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} or newer (Ada, Hopper, Blackwell); this worker "
            f"runs on {device}. Use --quantize none."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ModelUnavailable(
            f"quantize={mode} needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} "
            f"has {capability[0]}.{capability[1]}. Use --quantize none."
        )
    try:  # the names quantize_transformer uses: an older torchao lacks some
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: F401
    except ImportError:
        raise ModelUnavailable(
            f"quantize={mode} needs torchao 0.14 or newer: pip install 'fluxredux[fp8]'"
        ) from None


def quantize_transformer(transformer: torch.nn.Module, mode: Quantization) -> None:
    """Quantise ``transformer`` in place (``check_quantization`` first)."""
    if mode == "none":
        return
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    log.info("transformer quantised to fp8 (dynamic activations, per-row weights)")
