"""Reference image decoding and output encoding: what a user sees for each kind of file."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxredux.errors import ImageError
from fluxredux.images import DecodeLimits, decode_image, encode_image, parse_data_uri, to_data_uri
from tests.helpers import gradient, image_bytes

LIMITS = DecodeLimits(max_bytes=5 * 1024 * 1024, max_pixels=4_000_000)


def decode_error(data: bytes, limits: DecodeLimits = LIMITS) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, limits)
    return info.value


@pytest.mark.parametrize(
    ("fmt", "save"), [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True})]
)
def test_accepted_formats_decode_to_rgb(fmt: str, save: dict[str, object]) -> None:
    source = gradient()
    image = decode_image(image_bytes(source, fmt, **save), LIMITS)
    assert (image.mode, image.size) == ("RGB", source.size)
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(source, dtype=int))
    assert difference.mean() < 3


def test_gif_uses_the_first_frame() -> None:
    red, blue = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    data = image_bytes(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    source = gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = decode_image(image_bytes(source, "JPEG", exif=exif, quality=95), LIMITS)
    assert image.size == (48, 64)


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("CMYK", lambda: gradient().convert("CMYK")),
        ("P", lambda: gradient().convert("P")),
        ("LA", lambda: gradient().convert("LA")),
        ("RGBA", lambda: gradient().convert("RGBA")),
        ("L", lambda: gradient().convert("L")),
        ("I;16", lambda: Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))),
    ],
)
def test_any_mode_becomes_rgb(mode: str, make: object) -> None:
    source: Image.Image = make()  # type: ignore[operator]
    assert source.mode == mode
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(image_bytes(source, fmt), LIMITS)
    assert (image.mode, image.size) == ("RGB", source.size)
    if mode == "I;16":
        # 16-bit greys are scaled, not clipped: the image keeps its range.
        pixels = np.asarray(image)
        assert pixels.max() > 200 and pixels.min() < 10 and len(np.unique(pixels)) > 100


def test_transparent_pixels_become_white() -> None:
    source = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(image_bytes(source, "PNG"), LIMITS).getpixel((1, 1)) == (255, 255, 255)


def test_zero_bytes() -> None:
    error = decode_error(b"")
    assert error.code == "image_empty"
    assert "empty" in error.message


def test_too_many_bytes() -> None:
    error = decode_error(image_bytes(gradient(), "PNG"), DecodeLimits(max_bytes=100, max_pixels=10**6))
    assert error.code == "image_too_large"
    assert error.detail["limit_bytes"] == 100


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # 8000 x 6000 of one colour: a ~50 KB PNG that would decode to 48 megapixels.
    bomb = image_bytes(Image.new("L", (8000, 6000)), "PNG", optimize=True)
    assert len(bomb) < 200_000
    error = decode_error(bomb)
    assert error.code == "image_too_many_pixels"
    assert error.message == "the image is 8000x6000 pixels; the limit is 4,000,000 pixels"


def test_pillows_own_bomb_error_is_mapped_too() -> None:
    # 400 megapixels: over Pillow's global limit, which trips while opening.
    huge = image_bytes(Image.new("1", (20000, 20000)), "PNG", optimize=True)
    error = decode_error(huge, DecodeLimits(max_pixels=10**12))
    assert error.code == "image_too_many_pixels"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_file(fmt: str) -> None:
    data = image_bytes(gradient(256, 256), fmt, **({"quality": 90} if fmt != "PNG" else {}))
    error = decode_error(data[: len(data) // 2])
    assert error.code == "image_truncated"
    assert "truncated" in error.message


def test_damaged_file_of_an_accepted_format() -> None:
    data = bytearray(image_bytes(gradient(256, 256), "WEBP", quality=90))
    data[40:200] = bytes(160)  # same length, garbage inside
    assert decode_error(bytes(data)).code == "image_corrupt"


def test_non_image() -> None:
    error = decode_error(b"%!PS-Adobe-3.0 hello, this is plainly not an image" * 3)
    assert error.code == "image_not_an_image"
    assert "not an image" in error.message


@pytest.mark.parametrize(("fmt", "name"), [("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")])
def test_unsupported_formats_are_named(fmt: str, name: str) -> None:
    error = decode_error(image_bytes(gradient(), fmt))
    assert error.code == "image_unsupported_format"
    assert error.message.startswith(f"{name} images are not supported")


def test_svg_is_named_not_parsed() -> None:
    error = decode_error(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>')
    assert (error.code, error.detail["format"]) == ("image_unsupported_format", "SVG")


def test_data_uri_round_trip_and_errors() -> None:
    data = image_bytes(gradient(), "PNG")
    assert parse_data_uri(to_data_uri(data, "image/png"), max_bytes=10**6) == data
    with pytest.raises(ImageError) as info:
        parse_data_uri("data:image/png;base64,@@@@", max_bytes=10**6)
    assert info.value.code == "image_bad_data_uri"
    with pytest.raises(ImageError) as info:
        parse_data_uri(to_data_uri(b"x" * 5000), max_bytes=1000)
    assert info.value.code == "image_too_large"


# --- encoding -------------------------------------------------------------------------

PIXELS = np.asarray(
    Image.fromarray(
        (np.random.default_rng(0).normal(128, 40, (96, 128, 3))).clip(0, 255).astype(np.uint8)
    ).resize((256, 192))
)


@pytest.mark.parametrize(("fmt", "pillow_format"), [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_each_output_format_decodes_as_that_format(fmt: str, pillow_format: str) -> None:
    encoded = Image.open(io.BytesIO(encode_image(PIXELS, fmt, 80)))
    assert (encoded.format, encoded.size, encoded.mode) == (pillow_format, (256, 192), "RGB")


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_lower_quality_gives_a_smaller_file(fmt: str) -> None:
    sizes = [len(encode_image(PIXELS, fmt, quality)) for quality in (10, 50, 95)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_png_ignores_quality_and_is_lossless() -> None:
    assert encode_image(PIXELS, "png", 5) == encode_image(PIXELS, "png", 100)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(PIXELS, "png", 5)))), PIXELS)


@pytest.mark.parametrize("fmt", ["webp", "jpg", "png"])
def test_outputs_carry_no_metadata(fmt: str) -> None:
    encoded = Image.open(io.BytesIO(encode_image(PIXELS, fmt, 80)))
    assert not encoded.getexif()
    assert "icc_profile" not in encoded.info
    assert not {"exif", "xmp", "XML:com.adobe.xmp", "comment"} & set(encoded.info)


def test_a_stored_reference_records_its_size_as_displayed(tmp_path: Path) -> None:
    """A phone photo held sideways (EXIF orientation 6) is recorded at the size the model
    sees it, rotated: a final's size is computed from it, and the check on it is the one
    decode check the create makes (one decode, not two)."""
    from fluxredux.api.inputs import check_and_store
    from fluxredux.storage.local import LocalBlobStore

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": 64x48 as stored, 48x64 as displayed
    data = image_bytes(gradient(64, 48), "JPEG", exif=exif, quality=95)
    blobs = LocalBlobStore(tmp_path / "blobs")
    stored = asyncio.run(check_and_store(data, blobs, LIMITS))
    assert (stored.width, stored.height) == (48, 64)
    assert (stored.content_type, stored.size) == ("image/jpeg", len(data))
    assert blobs.get(stored.name) == data  # the original bytes, EXIF and all: the worker rotates
    upright = asyncio.run(check_and_store(image_bytes(gradient(64, 48), "PNG"), blobs, LIMITS))
    assert (upright.width, upright.height) == (64, 48)
