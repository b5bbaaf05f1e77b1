"""Memory profiles: which combination of ``quantize`` and ``offload`` fits a GPU.

Torch-free (the standard library and fluxredux.config only): the HTTP process, the CLI
(``fluxredux doctor``) and the worker before it loads anything all import it.

Every figure here is COMPUTED, never measured: parameter counts from the model's
architecture config (the same shapes as ``architecture.FULL``; tests/test_memory_profiles.py
checks each formula against the parameters of the real diffusers and transformers classes
built from those configs), times the bytes per parameter of each format, plus the parts
that stay on the GPU and a documented allowance for activations per megapixel of output.
What a GPU really uses is for a GPU run to measure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fluxredux.config import Offload, Quantization, Settings, TextEncoderQuantization

GIB = 1024**3
MIB = 1024**2

# --- the model's shapes -------------------------------------------------------------------
# FLUX.1 [schnell]'s transformer shapes: architecture.FULL builds its transformer from
# these (this module is torch-free, that one is not). Of the other parts, the keys these
# formulas read are copied below; a test asserts that each equals FULL's.
SCHNELL_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,  # schnell is guidance-distilled: no guidance input
}
SCHNELL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# google/siglip-so400m-patch14-384's vision tower (the Redux prior's image encoder).
SIGLIP_SO400M: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "image_size": 384,
    "patch_size": 14,
}
REDUX_EMBEDDER: dict[str, Any] = {"redux_dim": 1152, "txt_in_features": 4096}
# The text encoders a prompt loads (not in architecture.py: the Redux path never builds
# them): FLUX.1 [schnell]'s text_encoder_2 (T5 v1.1 XXL's encoder) and text_encoder (CLIP
# ViT-L/14's text model), from their published config.json files.
T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
}
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
}

# --- bytes per parameter ------------------------------------------------------------------
# Only the linear layers' weight matrices are converted by any quantization (torchao's
# quantize_ and bitsandbytes replace nn.Linear); biases and norm scales stay in bf16.
BF16_BYTES = 2.0
FP8_BYTES = 1.0
INT8_BYTES = 1.0
# bitsandbytes nf4: 4 bits a weight, and per block of 64 weights one absmax scale. We
# assume double quantization, as quantization.nf4_config asks (bnb_4bit_use_double_quant):
# each absmax is itself stored in 8 bits, with one fp32 scale per 256 of them. Without it
# each absmax is an fp32: 0.5 + 4/64 = 0.5625 bytes a weight.
NF4_BLOCK = 64
NF4_BYTES = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)  # 0.5159
# GGUF (ggml's block layouts): bytes per block / weights per block. A file named "Q4_K_S"
# holds mostly Q4_K tensors (the _S/_M/_L suffix moves a few tensors up a level): counted
# at its base type. city96's FLUX files quantize the blocks' 2-D weights only and keep the
# biases, norms and the input and output layers in F32; diffusers' loader reads those in
# the model's dtype, bf16, which is how they are counted.
GGUF_BYTES: dict[str, float] = {
    "F16": 2.0,
    "BF16": 2.0,
    "Q8_0": 34 / 32,
    "Q6_K": 210 / 256,
    "Q5_1": 24 / 32,
    "Q5_0": 22 / 32,
    "Q5_K": 176 / 256,
    "Q4_1": 20 / 32,
    "Q4_0": 18 / 32,
    "Q4_K": 144 / 256,
    "Q3_K": 110 / 256,
    "Q2_K": 84 / 256,
}
# Dequantized on the fly (int8 weight-only, nf4, gguf): a layer's weight is expanded to
# bf16 for its matmul, so one extra copy of the largest matrix lives during the step.
DEQUANTIZED_ON_THE_FLY = frozenset({"int8", "nf4", "gguf"})

# --- activations --------------------------------------------------------------------------
# Allowance, in the model's bf16, for what a denoising step and the VAE decode hold at once
# beyond the weights. The two stages never overlap (the latents are all that crosses), so
# a profile needs the larger one.
#
# The transformer: FLUX's 2x2 patches of the 8x-downscaled latent make 4096 image tokens per
# 1024x1024 megapixel, joined by 512 T5 (a prompt; zeros without) + 729 Redux tokens per
# image: sized for that, the longest sequence (the zero-token collapse makes it shorter).
# At the widest point of a block (the single block: residual, normed input, the MLP's 4x
# hidden and its activation, q/k/v, the attention output and the 5x concat before proj_out)
# at most 16 hidden-size vectors a token are alive; the attention itself is a fused kernel
# (flash/memory-efficient SDPA: linear in the sequence, not the S^2 of _native_math).
TRANSFORMER_LIVE_WIDTHS = 16
IMAGE_TOKENS_PER_MEGAPIXEL = 1024 * 1024 // (8 * 2) ** 2  # 4096
TEXT_TOKENS_PER_IMAGE = 512 + 729
# The VAE decoder's widest map at the output's full resolution (the last upsampler's output,
# block_out_channels[1] = 256 channels); a ResNet block there holds its input, the norm's and
# the activation's outputs (3 such maps), and one more is allowed for cuDNN's convolution
# workspace and the conv's output.
VAE_LIVE_MAPS = 4
PIXELS_PER_MEGAPIXEL = 1024 * 1024
# What auto sizes for: one output of the default size (1 MP). A request may ask up to 4 MP
# in all (schema.MAX_AREA: 4 outputs of ~1 MP, or one 4x upscale); each megapixel beyond the
# first adds the per-megapixel allowance (mostly the VAE decode's), which the margin below
# covers only in part: `fluxredux doctor` shows both figures.
SIZING_MEGAPIXELS = 1.0
MAX_REQUEST_MEGAPIXELS = 4.0
# The Redux conditioning cache lives on the GPU too (conditioning_cache_mb).
DEFAULT_CONDITIONING_CACHE_MB: int = Settings.model_fields["conditioning_cache_mb"].default

# --- fitting ------------------------------------------------------------------------------
# A profile fits when its computed need plus a margin is at most the free memory: 10% of
# the need, and at least 1 GiB. It covers what the count leaves out: the CUDA context and
# kernels' own memory in a worker started later than the measurement, cuBLAS/cuDNN
# workspaces, the caching allocator's fragmentation, per-row quantization scales (under
# 0.2%), and the estimate's own error.
MARGIN_FRACTION = 0.10
MARGIN_MIN_BYTES = 1 * GIB

# fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer (quantization.FP8_MIN_CAPABILITY, which
# imports torch; a test keeps the two equal).
FP8_MIN_CAPABILITY = (8, 9)
AUTO = "auto"
MANUAL = "manual"


# --- parameter counts from the configs ----------------------------------------------------


@dataclass(frozen=True)
class Params:
    """A parameter count, split into what quantization converts (the weight matrices of
    linear layers) and the rest (biases, norms, convolutions, embeddings: kept in bf16)."""

    matrices: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.matrices + self.other

    def __add__(self, other: Params) -> Params:
        return Params(self.matrices + other.matrices, self.other + other.other)

    def times(self, n: int) -> Params:
        return Params(self.matrices * n, self.other * n)


def _linear(inputs: int, outputs: int, *, bias: bool = True) -> Params:
    return Params(inputs * outputs, outputs if bias else 0)


def _sum(parts: list[Params]) -> Params:
    total = Params()
    for part in parts:
        total = total + part
    return total


@dataclass(frozen=True)
class TransformerParams:
    """FluxTransformer2DModel's parameters, by where group offloading puts them."""

    outer: Params  # embedders, the final norm and projection: always on the GPU
    double_block: Params
    single_block: Params
    double_blocks: int
    single_blocks: int
    hidden_size: int
    largest_layer: int  # one leaf module's parameters: what sequential offload holds at once
    largest_matrix: int  # one linear weight's elements: what a dequantization expands

    @property
    def blocks(self) -> Params:
        return self.double_block.times(self.double_blocks) + self.single_block.times(self.single_blocks)

    @property
    def all(self) -> Params:
        return self.outer + self.blocks

    @property
    def total(self) -> int:
        return self.all.total


def transformer_params(config: Mapping[str, Any]) -> TransformerParams:
    """The parameters of ``FluxTransformer2DModel(**config)`` (diffusers), by formula.

    With D = heads x head_dim and h = head_dim, every linear layer with its bias:
    - a double block (FluxTransformerBlock): two AdaLayerNormZero (D -> 6D), attention over
      both streams (q, k, v and out for the image, the same for the text: 8 x D -> D), four
      RMSNorms of h (q, k and their text twins), two GELU MLPs (D -> 4D -> D):
      36 D^2 + 30 D + 4 h;
    - a single block: AdaLayerNormZeroSingle (D -> 3D), q, k, v (3 x D -> D), proj_mlp
      (D -> 4D), proj_out (5D -> D), two RMSNorms of h: 15 D^2 + 11 D + 2 h;
    - outside the blocks: the timestep embedder (256 -> D -> D), the pooled text embedder
      (pooled -> D -> D), a guidance embedder like the timestep's when guidance_embeds,
      context_embedder (joint -> D), x_embedder (in -> D), norm_out (D -> 2D) and proj_out
      (D -> patch^2 x out channels).
    """
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    d = heads * head_dim
    rms_norm = Params(0, head_dim)  # elementwise_affine: one scale per channel, no bias
    ada_norm_zero = _linear(d, 6 * d)
    attention_qkvo = [_linear(d, d)] * 4
    mlp = [_linear(d, 4 * d), _linear(4 * d, d)]
    double = _sum(
        [ada_norm_zero, ada_norm_zero, *attention_qkvo, *attention_qkvo, *mlp, *mlp, *[rms_norm] * 4]
    )
    single = _sum(
        [_linear(d, 3 * d), *[_linear(d, d)] * 3, _linear(d, 4 * d), _linear(5 * d, d), rms_norm, rms_norm]
    )

    in_channels = int(config.get("in_channels", 64))
    out_channels = int(config.get("out_channels") or in_channels)
    patch = int(config.get("patch_size", 1))
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    timestep = [_linear(256, d), _linear(d, d)]
    embedders = [*timestep, _linear(pooled, d), _linear(d, d)]
    if config.get("guidance_embeds", False):
        embedders += timestep
    final = [_linear(d, 2 * d), _linear(d, patch * patch * out_channels)]
    linears = [_linear(joint, d), _linear(in_channels, d), *embedders, *final]
    leaf_layers = [*linears, ada_norm_zero, _linear(5 * d, d), _linear(4 * d, d), _linear(d, 4 * d)]
    return TransformerParams(
        outer=_sum(linears),
        double_block=double,
        single_block=single,
        double_blocks=int(config["num_layers"]),
        single_blocks=int(config["num_single_layers"]),
        hidden_size=d,
        largest_layer=max(layer.total for layer in leaf_layers),
        largest_matrix=max(layer.matrices for layer in leaf_layers),
    )


def _conv(inputs: int, outputs: int, kernel: int) -> int:
    return inputs * outputs * kernel * kernel + outputs


def _group_norm(channels: int) -> int:
    return 2 * channels


def _resnet(inputs: int, outputs: int) -> int:
    # ResnetBlock2D without a time embedding: norm, 3x3 conv, norm, 3x3 conv, and a 1x1
    # shortcut conv when the channel count changes.
    shortcut = _conv(inputs, outputs, 1) if inputs != outputs else 0
    return (
        _group_norm(inputs)
        + _conv(inputs, outputs, 3)
        + _group_norm(outputs)
        + _conv(outputs, outputs, 3)
        + shortcut
    )


def _vae_mid_block(channels: int, attention: bool) -> int:
    # UNetMidBlock2D: two ResNets, and between them one single-head attention (a group norm,
    # q, k, v and out projections with biases).
    attention_params = _group_norm(channels) + 4 * (channels * channels + channels) if attention else 0
    return 2 * _resnet(channels, channels) + attention_params


def vae_params(config: Mapping[str, Any]) -> int:
    """The parameters of diffusers' ``AutoencoderKL(**config)`` with DownEncoderBlock2D /
    UpDecoderBlock2D blocks, by formula: the encoder (conv_in, per level ``layers_per_block``
    ResNets and a stride-2 downsampling conv but the last, the mid block, a group norm and
    conv_out to 2 x latent channels), the optional quant convs, and the decoder (conv_in,
    the mid block, per level ``layers_per_block + 1`` ResNets over the channels reversed and
    an upsampling conv but the last, a group norm and conv_out)."""
    channels = [int(c) for c in config["block_out_channels"]]
    layers = int(config["layers_per_block"])
    latent = int(config["latent_channels"])
    attention = bool(config.get("mid_block_add_attention", True))
    encoder = _conv(int(config["in_channels"]), channels[0], 3)
    previous = channels[0]
    for level, out in enumerate(channels):
        encoder += _resnet(previous, out) + (layers - 1) * _resnet(out, out)
        if level < len(channels) - 1:
            encoder += _conv(out, out, 3)
        previous = out
    encoder += _vae_mid_block(channels[-1], attention) + _group_norm(channels[-1])
    encoder += _conv(channels[-1], 2 * latent, 3)

    reversed_channels = channels[::-1]
    decoder = _conv(latent, reversed_channels[0], 3) + _vae_mid_block(reversed_channels[0], attention)
    previous = reversed_channels[0]
    for level, out in enumerate(reversed_channels):
        decoder += _resnet(previous, out) + layers * _resnet(out, out)
        if level < len(channels) - 1:
            decoder += _conv(out, out, 3)
        previous = out
    decoder += _group_norm(channels[0]) + _conv(channels[0], int(config["out_channels"]), 3)

    quant = _conv(2 * latent, 2 * latent, 1) if config.get("use_quant_conv", True) else 0
    post_quant = _conv(latent, latent, 1) if config.get("use_post_quant_conv", True) else 0
    return encoder + quant + post_quant + decoder


def vae_full_resolution_channels(config: Mapping[str, Any]) -> int:
    """The channels of the decoder's widest map at the output's resolution: the last
    upsampler keeps the level before's channels, and the last level has channels[0]."""
    channels = [int(c) for c in config["block_out_channels"]]
    return max(channels[:2])


def siglip_vision_params(config: Mapping[str, Any]) -> int:
    """The parameters of transformers' ``SiglipVisionModel(SiglipVisionConfig(**config))``:
    the patch embedding (a conv of patch x patch) and one position per patch, per layer two
    layer norms, q, k, v, out (H -> H) and the MLP (H -> I -> H), the post layer norm, and the
    attention-pooling head (a probe token, a multi-head attention with fused in-projection,
    a layer norm and an MLP), which the vision model builds by default."""
    hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    patch = int(config["patch_size"])
    positions = (int(config["image_size"]) // patch) ** 2
    layer_norm = 2 * hidden
    mlp = (hidden * inner + inner) + (inner * hidden + hidden)
    embeddings = 3 * patch * patch * hidden + hidden + positions * hidden
    layer = 2 * layer_norm + 4 * (hidden * hidden + hidden) + mlp
    head = hidden + 4 * (hidden * hidden + hidden) + layer_norm + mlp
    return embeddings + int(config["num_hidden_layers"]) * layer + layer_norm + head


def redux_embedder_params(config: Mapping[str, Any]) -> int:
    """diffusers' ReduxImageEncoder: redux_up (redux_dim -> 3 x txt) and redux_down (3 x txt -> txt)."""
    redux, text = int(config["redux_dim"]), int(config["txt_in_features"])
    return _linear(redux, 3 * text).total + _linear(3 * text, text).total


def t5_encoder_params(config: Mapping[str, Any]) -> Params:
    """transformers' ``T5EncoderModel`` (v1.1: gated GELU, no biases): the shared token
    embedding, per layer q, k, v, o and wi_0, wi_1, wo with two RMS norms, the first layer's
    relative position bias, and the final norm. Matrices: the linear layers'."""
    d, inner = int(config["d_model"]), int(config["d_kv"]) * int(config["num_heads"])
    d_ff, layers = int(config["d_ff"]), int(config["num_layers"])
    matrices = layers * (4 * d * inner + 3 * d * d_ff)
    other = int(config["vocab_size"]) * d + layers * 2 * d + d
    other += int(config["relative_attention_num_buckets"]) * int(config["num_heads"])
    return Params(matrices, other)


def clip_text_params(config: Mapping[str, Any]) -> int:
    """transformers' ``CLIPTextModel``: token and position embeddings, per layer two layer
    norms, q, k, v, out and the MLP (all with biases), and the final layer norm."""
    hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    embeddings = (int(config["vocab_size"]) + int(config["max_position_embeddings"])) * hidden
    layer = 4 * hidden + 4 * (hidden * hidden + hidden) + (hidden * inner + inner) + (inner * hidden + hidden)
    return embeddings + int(config["num_hidden_layers"]) * layer + 2 * hidden


@dataclass(frozen=True)
class ModelParts:
    """The parameter counts of every component, and the widths the activations follow."""

    transformer: TransformerParams
    vae: int
    image_encoder: int
    image_embedder: int
    vae_full_resolution_channels: int
    t5: Params
    clip: int

    @classmethod
    def from_configs(
        cls,
        transformer: Mapping[str, Any],
        vae: Mapping[str, Any],
        siglip: Mapping[str, Any],
        embedder: Mapping[str, Any],
        t5: Mapping[str, Any] = T5_XXL_ENCODER,
        clip: Mapping[str, Any] = CLIP_L_TEXT,
    ) -> ModelParts:
        return cls(
            transformer=transformer_params(transformer),
            vae=vae_params(vae),
            image_encoder=siglip_vision_params(siglip),
            image_embedder=redux_embedder_params(embedder),
            vae_full_resolution_channels=vae_full_resolution_channels(vae),
            t5=t5_encoder_params(t5),
            clip=clip_text_params(clip),
        )

    @property
    def prior(self) -> int:
        """The Redux prior (SigLIP + the embedder): always on the GPU (see redux_model.py)."""
        return self.image_encoder + self.image_embedder


FLUX_SCHNELL = ModelParts.from_configs(SCHNELL_TRANSFORMER, SCHNELL_VAE, SIGLIP_SO400M, REDUX_EMBEDDER)


# --- profiles -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryProfile:
    name: str
    quantize: Quantization
    offload: Offload
    note: str


# Fastest first; auto takes the first that fits. Among profiles of about the same speed, the
# one that gives up less precision comes first.
# - bf16: the weights' own precision, full speed; needs the most memory. First although fp8
#   may be faster: where bf16 fits nothing is given up, and fp8's gain is yet to be measured.
# - fp8: the matmuls on fp8 tensor cores (twice bf16's peak on Ada/Hopper), so full speed or
#   better, half the weight memory, a small precision cost; cc 8.9+ only.
# - int8: torchao weight-only: the same memory as fp8 on any CUDA GPU, but each weight is
#   expanded to bf16 for its matmul: no faster than bf16, and on a compute-bound 5k-token
#   step possibly slower.
# - nf4: bitsandbytes 4-bit, dequantized on the fly; diffusers' published figures: a Flux
#   transformer from 22.6 GB to about 6.7 GB with almost no slowdown. More lossy than int8,
#   hence after it.
# - nf4-model-offload: nf4 with whole components moved between CPU RAM and the GPU as each
#   runs: one transfer of each per prediction (not per step), so a fixed cost per image.
# - group-offload: bf16 transformer blocks streamed from CPU RAM one at a time, the next one
#   copied on a CUDA stream while this one computes: diffusers' published figures keep a
#   Flux transformer at about 0.5-10 GB at a measured cost; every step moves every block
#   over PCIe.
# - sequential-offload: accelerate moves each layer as it runs, without overlap: the
#   smallest footprint and by far the slowest.
# Not here: gguf needs a file (transformer_file) and is chosen by hand; doctor lists any
# GGUF it finds with its computed need.
PROFILES: tuple[MemoryProfile, ...] = (
    MemoryProfile("bf16", "none", "none", "the weights' own precision, full speed"),
    MemoryProfile("fp8", "fp8", "none", "fp8 tensor cores, half the weights; compute capability 8.9+"),
    MemoryProfile("int8", "int8", "none", "torchao int8 weight-only: fp8's memory on any CUDA GPU"),
    MemoryProfile("nf4", "nf4", "none", "bitsandbytes 4-bit, dequantized on the fly"),
    MemoryProfile("nf4-model-offload", "nf4", "model", "nf4, components moved to the GPU as each runs"),
    MemoryProfile("group-offload", "none", "group", "bf16 blocks streamed from CPU RAM, overlapped"),
    MemoryProfile("sequential-offload", "none", "sequential", "layer by layer from CPU RAM: the slowest"),
)
PROFILES_BY_NAME: dict[str, MemoryProfile] = {profile.name: profile for profile in PROFILES}


def profile_names() -> list[str]:
    return [profile.name for profile in PROFILES]


def gguf_profile(gguf_type: str) -> MemoryProfile:
    """A profile for a GGUF transformer of ``gguf_type`` (not in PROFILES: it needs a file)."""
    return MemoryProfile(
        f"gguf-{gguf_type}", "gguf", "none", f"a GGUF file ({gguf_type}), dequantized on the fly"
    )


_GGUF_TYPE = re.compile(
    r"(?<![A-Za-z0-9])(BF16|F16|Q[2-8]_(?:K|0|1))(?:_[SML])?(?![A-Za-z0-9])", re.IGNORECASE
)


def gguf_type_from_name(file_name: str) -> str | None:
    """The quantization type a GGUF file's name says (``flux1-schnell-Q4_K_S.gguf``: Q4_K),
    if it is one whose bytes per weight this module knows."""
    match = _GGUF_TYPE.search(file_name)
    if match is None:
        return None
    found = match.group(1).upper()
    return found if found in GGUF_BYTES else None


# --- the need -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """A profile's computed GPU memory at its peak, in bytes, by part."""

    weights: int  # what is on the GPU at the peak: resident parts and, offloaded, the part in use
    activations: int  # the larger of a denoising step's and the VAE decode's allowance
    cache: int  # the Redux conditioning cache

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.cache


def _weight_bytes(params: Params, quantize: Quantization, gguf_type: str | None) -> float:
    if quantize == "none":
        return params.total * BF16_BYTES
    if quantize == "fp8":
        per_weight = FP8_BYTES
    elif quantize == "int8":
        per_weight = INT8_BYTES
    elif quantize == "nf4":
        per_weight = NF4_BYTES
    else:
        if gguf_type is None or gguf_type not in GGUF_BYTES:
            raise ValueError(f"gguf needs a known type, one of {', '.join(GGUF_BYTES)}; got {gguf_type!r}")
        per_weight = GGUF_BYTES[gguf_type]
    return params.matrices * per_weight + params.other * BF16_BYTES


def transformer_bytes(parts: ModelParts, quantize: Quantization, gguf_type: str | None = None) -> int:
    """The transformer's weights in ``quantize``'s format (computed)."""
    transformer = parts.transformer
    if quantize == "gguf":  # the blocks' matrices quantized, the outer layers kept (see GGUF_BYTES)
        return round(
            _weight_bytes(transformer.blocks, "gguf", gguf_type)
            + _weight_bytes(transformer.outer, "none", None)
        )
    return round(_weight_bytes(transformer.all, quantize, gguf_type))


def transformer_activation_bytes(parts: ModelParts, megapixels: float) -> int:
    tokens = megapixels * (IMAGE_TOKENS_PER_MEGAPIXEL + TEXT_TOKENS_PER_IMAGE)
    return round(tokens * TRANSFORMER_LIVE_WIDTHS * parts.transformer.hidden_size * BF16_BYTES)


def vae_decode_bytes(parts: ModelParts, megapixels: float) -> int:
    pixels = megapixels * PIXELS_PER_MEGAPIXEL
    return round(pixels * VAE_LIVE_MAPS * parts.vae_full_resolution_channels * BF16_BYTES)


def text_encoder_bytes(parts: ModelParts = FLUX_SCHNELL, quantize: TextEncoderQuantization = "none") -> int:
    """T5 (in ``text_encoder_quantize``'s format) and CLIP (bf16): what a prompt adds to the
    GPU with offload none (held through denoising with text_encoders=keep, only while the
    prompt is encoded with unload). Not in any profile's need: requests without a prompt
    never load them."""
    return round(_weight_bytes(parts.t5, quantize, None) + parts.clip * BF16_BYTES)


def need(
    profile: MemoryProfile,
    parts: ModelParts = FLUX_SCHNELL,
    *,
    megapixels: float = SIZING_MEGAPIXELS,
    conditioning_cache_mb: int = DEFAULT_CONDITIONING_CACHE_MB,
    gguf_type: str | None = None,
) -> Need:
    """``profile``'s computed GPU memory for outputs of ``megapixels`` in all, by part.

    What is on the GPU at the peak, by offload mode:
    - none: the transformer (in its format), the VAE and the Redux prior;
    - model: the prior (loaded beside the pipeline, never offloaded) and the larger of the
      transformer with a step's activations and the VAE with its decode, one at a time;
    - group: the prior, the VAE, the transformer's outer layers, and two blocks (the one
      computing and the next, prefetched on a stream; one block per group, as diffusers
      requires with streams), the larger kind (double);
    - sequential: the prior and the largest single layer.
    """
    transformer = parts.transformer
    prior = parts.prior * BF16_BYTES
    vae = parts.vae * BF16_BYTES
    steps = transformer_activation_bytes(parts, megapixels)
    if profile.quantize in DEQUANTIZED_ON_THE_FLY:
        steps += round(transformer.largest_matrix * BF16_BYTES)
    decode = vae_decode_bytes(parts, megapixels)
    weights_of_transformer = transformer_bytes(parts, profile.quantize, gguf_type)
    if profile.offload == "none":
        weights = prior + weights_of_transformer + vae
        activations = max(steps, decode)
    elif profile.offload == "model":
        # Counted as weights + activations of whichever component is in: the larger pair.
        if weights_of_transformer + steps >= vae + decode:
            weights, activations = prior + weights_of_transformer, steps
        else:
            weights, activations = prior + vae, decode
    elif profile.offload == "group":
        if profile.quantize != "none":
            raise ValueError("group offload streams bf16 blocks: it combines with quantize none only")
        largest_block = max(transformer.double_block.total, transformer.single_block.total)
        weights = prior + vae + (transformer.outer.total + 2 * largest_block) * BF16_BYTES
        activations = max(steps, decode)
    else:  # sequential
        weights = prior + transformer.largest_layer * BF16_BYTES
        activations = max(steps, decode)
    return Need(weights=round(weights), activations=activations, cache=conditioning_cache_mb * MIB)


def needed_bytes(
    profile: MemoryProfile,
    parts: ModelParts = FLUX_SCHNELL,
    *,
    megapixels: float = SIZING_MEGAPIXELS,
    conditioning_cache_mb: int = DEFAULT_CONDITIONING_CACHE_MB,
    gguf_type: str | None = None,
) -> int:
    """The GPU memory ``profile`` needs (computed, see ``need``), in bytes."""
    return need(
        profile,
        parts,
        megapixels=megapixels,
        conditioning_cache_mb=conditioning_cache_mb,
        gguf_type=gguf_type,
    ).total


def margin_bytes(needed: int) -> int:
    return max(round(needed * MARGIN_FRACTION), MARGIN_MIN_BYTES)


# --- the choice ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceReport:
    """One CUDA GPU as devices.cuda_devices() reads it (torch-free: tests make their own)."""

    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]


ChoiceHow = Literal["auto", "requested", "no_cuda"]


@dataclass(frozen=True)
class ProfileChoice:
    profile: MemoryProfile
    reason: str
    how: ChoiceHow = "auto"
    free_bytes: int | None = None
    needed_bytes: int | None = None


def unmet_requirement(profile: MemoryProfile, device: DeviceReport) -> str | None:
    """What ``device`` lacks to run ``profile``, or None."""
    if profile.quantize == "fp8" and tuple(device.capability) < FP8_MIN_CAPABILITY:
        wanted = ".".join(map(str, FP8_MIN_CAPABILITY))
        return f"needs compute capability {wanted}+ (this GPU: {device.capability[0]}.{device.capability[1]})"
    return None


def fits(profile: MemoryProfile, device: DeviceReport, needed: int) -> bool:
    return unmet_requirement(profile, device) is None and needed + margin_bytes(needed) <= device.free_bytes


def _gib(size: float) -> str:
    return f"{size / GIB:.1f}"


def check_requested(requested: str) -> None:
    """ValueError unless ``requested`` is auto, manual or a profile's name."""
    if requested not in (AUTO, MANUAL) and requested not in PROFILES_BY_NAME:
        names = ", ".join(profile_names())
        raise ValueError(f"unknown memory profile {requested!r}: use {AUTO}, {MANUAL} or one of {names}")


def choose_profile(
    device: DeviceReport | None,
    *,
    requested: str = AUTO,
    megapixels: float = SIZING_MEGAPIXELS,
    conditioning_cache_mb: int = DEFAULT_CONDITIONING_CACHE_MB,
    parts: ModelParts = FLUX_SCHNELL,
    cannot_run: Callable[[MemoryProfile], str | None] = lambda profile: None,
) -> ProfileChoice:
    """The profile for ``device`` (None: no CUDA GPU). ``cannot_run``: what the worker
    lacks for a profile (a package not installed, a setting it cannot combine with), or
    None; auto passes over those, saying why.

    - no device: the bf16 row (quantize none, offload none), so the caller changes nothing;
    - a profile's name: that profile, whatever fits (the reason says when it may not);
    - auto: the first (fastest) profile whose requirements the device meets and whose need
      plus the margin (10%, at least 1 GiB) fits its free memory; the last (sequential
      offload) if none does, saying so.

    ``manual`` is for the caller (it applies no profile): ValueError here, as for a name
    that is no profile's.
    """
    check_requested(requested)
    if requested == MANUAL:
        raise ValueError(
            "memory profile manual: quantize and offload stay as given; there is no profile to choose"
        )
    if device is None:
        return ProfileChoice(PROFILES[0], "no CUDA GPU: profiles apply to CUDA only", how="no_cuda")

    def needed(profile: MemoryProfile) -> int:
        return needed_bytes(
            profile, parts, megapixels=megapixels, conditioning_cache_mb=conditioning_cache_mb
        )

    free = device.free_bytes
    if requested != AUTO:
        profile = PROFILES_BY_NAME[requested]
        amount = needed(profile)
        reason = f"requested; it needs {_gib(amount)} GiB (computed), {_gib(free)} GiB free"
        if (problem := unmet_requirement(profile, device)) is not None:
            reason += f"; it {problem}"
        elif not fits(profile, device, amount):
            reason += f"; with the {_gib(margin_bytes(amount))} GiB margin it may not fit"
        return ProfileChoice(profile, reason, how="requested", free_bytes=free, needed_bytes=amount)

    passed: list[str] = []
    for profile in PROFILES:
        amount = needed(profile)
        if (lacking := cannot_run(profile)) is not None:
            passed.append(f"{profile.name} {lacking}")
            continue
        if fits(profile, device, amount):
            reason = (
                f"{_gib(free)} GiB free: {profile.name} needs {_gib(amount)} GiB (computed) "
                f"+ {_gib(margin_bytes(amount))} margin"
            )
            if passed:
                reason += "; " + ", ".join(passed)
            return ProfileChoice(profile, reason, how="auto", free_bytes=free, needed_bytes=amount)
        problem = unmet_requirement(profile, device)
        passed.append(f"{profile.name} {problem}" if problem else f"{profile.name} needs {_gib(amount)}")
    last = PROFILES[-1]
    amount = needed(last)
    reason = (
        f"{_gib(free)} GiB free: nothing fits with the margin; {last.name}, the smallest, "
        f"needs {_gib(amount)} GiB (computed) + {_gib(margin_bytes(amount))} margin"
    )
    return ProfileChoice(last, reason, how="auto", free_bytes=free, needed_bytes=amount)


def describe_choice(choice: ProfileChoice) -> str:
    """One short line for logs, /health and ``fluxredux workers``."""
    if choice.how == "no_cuda":
        return "no memory profile (no CUDA GPU)"
    if choice.how == "requested":
        return f"memory profile {choice.profile.name} (requested)"
    free = "" if choice.free_bytes is None else f": {_gib(choice.free_bytes)} GiB free"
    return f"memory profile {choice.profile.name} (auto{free})"
