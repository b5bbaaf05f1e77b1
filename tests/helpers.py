"""What many tests share: small test images, and how to call the real command line."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
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


def png_data_uri(width: int = 24, height: int = 16) -> str:
    """A small flat PNG as a data: URI: a valid redux_image for any request."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# The installed command, beside this interpreter (the venv's).
FLUXREDUX = str(Path(sys.executable).with_name("fluxredux"))
# The API's terminal statuses.
TERMINAL = {"success", "error", "cancelled"}
