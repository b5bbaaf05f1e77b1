"""The transformer's weights in fewer bytes, as the settings say (docs/performance.md has
the memory profiles that choose among them).

- fp8 and int8: torchao's documented one-call quantisation, after loading, in place. fp8:
  dynamic float8 activations and float8 weights scaled per row, on fp8 tensor cores (Ada,
  Hopper: twice bf16's peak), half the memory. int8: weight-only int8 (activations stay
  in the model's dtype), half bf16's memory on any CUDA GPU, and on CPUs.
- nf4: bitsandbytes 4-bit NormalFloat through diffusers' quantization config, at load
  (the weights are quantised as they are read: the bf16 transformer never needs to fit).
- gguf: a GGUF checkpoint (``transformer_file``), read by diffusers' GGUF loader; its
  weights stay quantised and are dequantised layer by layer as they run.

Only the transformer (and, with ``text_encoder_quantize``, T5): it is where the bytes and
the time are; the VAE and the image encoders are small and more sensitive.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from fluxredux.config import Offload, Quantization, TextEncoderQuantization
from fluxredux.errors import ModelUnavailable

log = logging.getLogger(__name__)

# fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
# Quantised after loading, by torchao: the rest are quantised as they load.
TORCHAO_MODES = frozenset({"fp8", "int8"})
# What each mode combines with (diffusers' own support): torchao's tensors are not moved by
# accelerate's offload hooks, nor streamed by group offloading; bitsandbytes and GGUF
# layers follow a whole model to and from the GPU (model offload), not layer by layer.
COMBINES_WITH: dict[str, frozenset[str]] = {
    "none": frozenset({"none", "model", "sequential", "group"}),
    "fp8": frozenset({"none"}),
    "int8": frozenset({"none"}),
    "nf4": frozenset({"none", "model"}),
    "gguf": frozenset({"none", "model"}),
}


def _needs_cuda(what: str, device: torch.device, gpu: str = "a CUDA GPU", flag: str = "--quantize") -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelUnavailable(f"{what} needs {gpu}; this worker runs on {device}. Use {flag} int8 or none.")


def _needs_torchao(what: str) -> None:
    try:  # the names quantize_transformer uses: an older torchao lacks some
        from torchao.quantization import (  # noqa: F401
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        extra = "fp8" if "fp8" in what else "int8"
        raise ModelUnavailable(
            f"{what} needs torchao 0.14 or newer: pip install 'fluxredux[{extra}]'"
        ) from None


def _needs_bitsandbytes(what: str) -> None:
    # Looked for, not imported: importing it initialises its CUDA backend, and the optional
    # package need not be installed for the type checker either.
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelUnavailable(f"{what} needs bitsandbytes with its CUDA build: pip install 'fluxredux[nf4]'")


def check_quantization(
    mode: Quantization,
    device: torch.device,
    *,
    offload: Offload = "none",
    transformer_file: str | None = None,
) -> None:
    """ModelUnavailable, said plainly, when ``mode`` cannot run on ``device`` (or with
    ``offload``): before any weight is loaded, so a misconfigured worker says so in a second,
    naming the flag and the way out. Never a silent fallback to bf16."""
    if offload not in COMBINES_WITH[mode]:
        ways = ", ".join(sorted(COMBINES_WITH[mode]))
        raise ModelUnavailable(
            f"quantize={mode} cannot be combined with offload={offload} (it combines with offload {ways}); "
            "see fluxredux doctor for the profiles that fit this GPU"
        )
    if transformer_file and mode != "gguf":
        raise ModelUnavailable(
            f"--transformer-file is a GGUF checkpoint: it needs --quantize gguf, not {mode}"
        )
    if mode == "none":
        return
    if mode == "fp8":
        gpu = "a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
        _needs_cuda("quantize=fp8", device, gpu)
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ModelUnavailable(
                f"quantize=fp8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} "
                f"has {capability[0]}.{capability[1]}. Use --quantize int8 (the same memory) or none."
            )
        _needs_torchao("quantize=fp8")
    elif mode == "int8":
        _needs_torchao("quantize=int8")
    elif mode == "nf4":
        _needs_cuda("quantize=nf4", device, "a CUDA GPU (bitsandbytes 4-bit)")
        _needs_bitsandbytes("quantize=nf4")
    elif mode == "gguf":
        if not transformer_file:
            raise ModelUnavailable(
                "quantize=gguf needs --transformer-file PATH_OR_HF_FILE (a GGUF checkpoint of FLUX.1 "
                "[schnell]'s transformer; fluxredux download --gguf Q8_0 fetches one)"
            )
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelUnavailable(
                "quantize=gguf needs the gguf package: pip install 'fluxredux[gguf]'"
            ) from None


def check_text_encoder_quantization(
    mode: TextEncoderQuantization, device: torch.device, offload: Offload = "none"
) -> None:
    if mode == "none":
        return
    if offload == "sequential":  # as for the transformer: quantised tensors are not streamed
        raise ModelUnavailable(f"text_encoder_quantize={mode} cannot be combined with offload=sequential")
    if mode == "int8":
        _needs_torchao("text_encoder_quantize=int8")
    elif mode == "nf4":
        gpu = "a CUDA GPU (bitsandbytes 4-bit)"
        _needs_cuda("text_encoder_quantize=nf4", device, gpu, flag="--text-encoder-quantize")
        _needs_bitsandbytes("text_encoder_quantize=nf4")


def is_quantized(transformer: torch.nn.Module) -> bool:
    """Whether torchao has quantised ``transformer``'s linear layers already."""
    linear = next((m for m in transformer.modules() if isinstance(m, torch.nn.Linear)), None)
    return linear is not None and type(linear.weight).__module__.startswith("torchao")


def quantize_transformer(
    transformer: torch.nn.Module, mode: Quantization, device: torch.device | None = None
) -> None:
    """Quantise ``transformer`` in place when ``mode`` is torchao's (``check_quantization``
    first); nf4 and gguf were quantised as they loaded. With ``device``, each layer is moved
    there as it is quantised: a transformer on the CPU reaches the GPU quantised, never
    whole in bf16 (which is what a card that needs the smaller weights cannot hold). Once."""
    if mode not in TORCHAO_MODES or is_quantized(transformer):
        return
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    if mode == "fp8":
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), device=device)
        log.info("transformer quantised to fp8 (dynamic activations, per-row weights)")
    else:
        quantize_(transformer, Int8WeightOnlyConfig(), device=device)
        log.info("transformer quantised to int8 (weight-only)")


def quantize_text_encoder(model: torch.nn.Module, mode: TextEncoderQuantization) -> None:
    """T5 in place, for int8 (nf4 is given to its loader: ``nf4_config``)."""
    if mode != "int8":
        return
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    log.info("T5 quantised to int8 (weight-only)")


def nf4_config(dtype: torch.dtype, *, for_transformers: bool = False) -> object:
    """bitsandbytes' 4-bit NormalFloat with double quantisation (the scales quantised too),
    computing in ``dtype``: diffusers' config for the transformer, transformers' for T5."""
    options = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": dtype,
    }
    if for_transformers:
        from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

        return TransformersBitsAndBytesConfig(**options)
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(**options)
