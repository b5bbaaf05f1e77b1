"""What many tests share: small test images, how to call the real command line, a clock
that moves only when told, and threads run at once."""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
from collections.abc import Callable, Iterable
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


class FakeClock:
    """Unix time that moves only when a test moves it (``clock.now += 31``)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_threads(targets: Iterable[Callable[[], object]], timeout: float = 60) -> None:
    """Run ``targets`` at once, each in a thread of its own, and wait for all of them: an
    exception in any of them fails the test, and so does one still running at ``timeout``."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {timeout:g} s"
    assert errors == []
