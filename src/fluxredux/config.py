"""Settings, read from the environment (prefix ``FLUXREDUX_``) and command-line flags.

Built once at the entry point and passed down; no module reads the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelChoice = Literal["auto", "flux", "demo"]
Offload = Literal["none", "model", "sequential"]

SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXREDUX_", extra="ignore")

    model: ModelChoice = Field(
        "auto",
        description="auto: the real model when a CUDA GPU is present, else the demo model. "
        "flux: the real FLUX.1 weights. demo: tiny random weights (outputs are noise).",
    )
    schnell_model: str = Field(
        SCHNELL_REPO, description="FLUX.1 [schnell]: a local diffusers folder or a Hugging Face repo id."
    )
    redux_model: str = Field(
        REDUX_REPO, description="FLUX.1 Redux prior: a local diffusers folder or a Hugging Face repo id."
    )
    offload: Offload = Field(
        "none",
        description="CUDA only. model: keep idle components in CPU RAM (saves ~10 GiB of GPU memory, "
        "slower); sequential: stream weights layer by layer (smallest GPU footprint, much slower).",
    )
    device: str | None = Field(None, description="torch device; default cuda when present, else cpu.")
    cache_dir: Path = Field(
        default_factory=lambda: platformdirs.user_cache_path("fluxredux"),
        description="Where the demo model is written.",
    )
    max_image_bytes: int = Field(25 * 1024 * 1024, gt=0, description="Largest reference image file.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest reference image, in pixels (decompression-bomb guard)."
    )
    safety_threshold: float = Field(
        0.5, ge=0, le=1, description="Detector score at or above which an explicit detection counts."
    )
