"""Small builders of test images."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def image_bytes(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """A small RGB image whose every pixel differs, so orientation changes are visible."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
