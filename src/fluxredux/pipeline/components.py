"""The loaded model's parts as one value: FLUX.1 [schnell]'s pipeline and the Redux prior.

Loading (from disk or random weights), the speed settings and their warm-up, and the
conditioning all take this one bundle, so that adding or swapping a part (a test's
counting image encoder: ``dataclasses.replace``) touches one place, not every parameter list.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FluxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from transformers import SiglipImageProcessorPil, SiglipVisionModel


@dataclass(frozen=True)
class ReduxComponents:
    """What a Redux prediction runs: the Redux prior (SigLIP's preprocessing and encoder,
    then the Redux embedder) makes the conditioning, the pipeline denoises and decodes it.
    Frozen: the parts are set together at load time; a variant is a new bundle."""

    pipe: FluxPipeline  # without text encoders: a prompt's are loaded apart (text_encoders.py)
    image_encoder: SiglipVisionModel
    feature_extractor: SiglipImageProcessorPil
    image_embedder: ReduxImageEncoder
