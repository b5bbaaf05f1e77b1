"""Reference image decoding: bytes in, an RGB Pillow image out, or a specific error.

Only the formats we accept are ever parsed (JPEG, PNG, WEBP, GIF). Limits on bytes and
pixels are checked before any pixel data is decoded, so a decompression bomb costs a
header read, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from fluxredux.errors import ImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")

# Formats people commonly send that we recognise only to name them in the error.
# Matching magic bytes (instead of letting Pillow try every plugin) keeps the parsers
# we expose to untrusted bytes down to the four we accept.
_OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"%PDF", "PDF"),
    (0, b"\xff\x0a", "JPEG XL"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "SVG/XML"),
)


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode an uploaded reference image to RGB, EXIF orientation applied.

    Raises ImageError with one of the codes: image_empty, image_too_large,
    image_unsupported_format, image_not_an_image, image_too_many_pixels,
    image_truncated, image_corrupt.
    """
    return to_rgb(ImageOps.exif_transpose(load_checked(data, limits)))


def load_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """The image as stored, its first frame fully decoded (so every check decode_image
    makes is made), in its own mode and orientation, its ``format`` known. For a create's
    check, which needs only the format and the displayed size: converting and rotating the
    pixels too would be work thrown away on the path of every create."""
    if not data:
        raise ImageError("image_empty", "the image file is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "image_too_large",
            f"the image file is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes",
            size_bytes=len(data),
            limit_bytes=limits.max_bytes,
        )

    with warnings.catch_warnings():
        # We enforce our own pixel limit below; Pillow's global bomb warning would only
        # add noise (and its error, at twice its own limit, is mapped below too).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels(None, limits) from exc
        except UnidentifiedImageError as exc:
            other = _sniff_other_format(data)
            if other is None and (_declared_webp_size(data) or 0) > len(data):
                raise _truncated() from exc
            if other:
                raise ImageError(
                    "image_unsupported_format",
                    f"{other} images are not supported; send JPEG, PNG, WEBP or GIF",
                    format=other,
                ) from exc
            raise ImageError(
                "image_not_an_image", "the file is not an image (JPEG, PNG, WEBP or GIF expected)"
            ) from exc
        except OSError as exc:
            # A recognised format whose decoder refused the data at open (Pillow's WEBP
            # decoder reads the whole file up front).
            if (_declared_webp_size(data) or 0) > len(data):
                raise _truncated() from exc
            raise ImageError("image_corrupt", "the image file is damaged and cannot be decoded") from exc

        width, height = image.size
        if width * height > limits.max_pixels:
            raise _too_many_pixels((width, height), limits)
        try:
            image.seek(0)  # GIF / animated WEBP: the first frame only
            image.load()
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels((width, height), limits) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
                raise _truncated() from exc
            raise ImageError("image_corrupt", f"the {image.format} image could not be decoded") from exc
    return image


# EXIF orientations that turn the picture a quarter (transposed, rotated 90 or 270):
# width and height swap when it is displayed.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """The size ``image`` has once its EXIF orientation is applied, as decode_image applies it."""
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert() clips to 0-255 instead of scaling.
        grey = (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _truncated() -> ImageError:
    return ImageError("image_truncated", "the image file is truncated (incomplete download?)")


def _too_many_pixels(size: tuple[int, int] | None, limits: DecodeLimits) -> ImageError:
    # Without a size, Pillow's own (larger, global) bomb limit tripped while opening.
    what = f"the image is {size[0]}x{size[1]} pixels" if size else "the image has far too many pixels"
    return ImageError(
        "image_too_many_pixels",
        f"{what}; the limit is {limits.max_pixels:,} pixels",
        limit_pixels=limits.max_pixels,
    )


def _declared_webp_size(data: bytes) -> int | None:
    """The file size a WEBP's RIFF header promises, to tell truncation from damage."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8
    return None


def _sniff_other_format(data: bytes) -> str | None:
    head = data[:64].lstrip() if data[:1] in (b" ", b"\n", b"\r", b"\t") else data[:64]
    for offset, magic, name in _OTHER_FORMATS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None
