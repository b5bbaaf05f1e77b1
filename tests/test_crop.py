"""How a reference is made square for the image encoder (redux_image_crop)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fluxredux.images import square_reference
from fluxredux.images.crop import PAD_COLOUR


def portrait() -> Image.Image:
    """300x600: a red top half over a blue bottom half."""
    image = Image.new("RGB", (300, 600), (255, 0, 0))
    image.paste((0, 0, 255), (0, 300, 300, 600))
    return image


def test_squash_leaves_the_image_to_the_encoders_stretching() -> None:
    image = portrait()
    assert square_reference(image, "squash") is image


def test_center_keeps_the_middle_square_undistorted() -> None:
    square = square_reference(portrait(), "center")
    assert square.size == (300, 300)
    pixels = np.asarray(square)
    assert (pixels[0, 0] == (255, 0, 0)).all() and (pixels[-1, -1] == (0, 0, 255)).all()  # half each


def test_pad_fits_everything_inside_grey_bars() -> None:
    square = square_reference(portrait(), "pad")
    assert square.size == (600, 600)
    pixels = np.asarray(square)
    assert tuple(pixels[300, 0]) == PAD_COLOUR and tuple(pixels[300, -1]) == PAD_COLOUR  # the bars
    assert tuple(pixels[0, 300]) == (255, 0, 0) and tuple(pixels[-1, 300]) == (0, 0, 255)  # all of it


def test_a_square_reference_is_left_as_it_is() -> None:
    square = Image.new("RGB", (64, 64), (1, 2, 3))
    assert all(square_reference(square, mode) is square for mode in ("squash", "center", "pad"))
