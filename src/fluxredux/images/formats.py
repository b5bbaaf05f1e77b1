"""The one table of image formats: Pillow's name, file extension and content type.

Reference images may be any of the accepted input formats; outputs are one of the
``output_format`` values. Stored file names end in the format's extension, and the
content type a file is served with comes from here too, so the three never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    pillow: str  # Pillow's format name, as ``Image.format`` reports it
    extension: str  # of stored files
    content_type: str


JPEG = ImageFormat("JPEG", "jpg", "image/jpeg")
PNG = ImageFormat("PNG", "png", "image/png")
WEBP = ImageFormat("WEBP", "webp", "image/webp")
GIF = ImageFormat("GIF", "gif", "image/gif")

# Reference images we accept, by Pillow's name (images.decode checks the same four).
INPUT_FORMATS: dict[str, ImageFormat] = {f.pillow: f for f in (JPEG, PNG, WEBP, GIF)}

# The ``output_format`` input's values.
OUTPUT_FORMATS: dict[str, ImageFormat] = {"webp": WEBP, "jpg": JPEG, "png": PNG}

# What a stored file's extension says it holds. "jpeg" was written by early versions.
CONTENT_TYPES_BY_EXTENSION: dict[str, str] = {
    **{f.extension: f.content_type for f in INPUT_FORMATS.values()},
    "jpeg": JPEG.content_type,
}


def content_type_for(name: str) -> str | None:
    """The content type of a stored file, from its name's extension; None if unknown."""
    _, dot, extension = name.rpartition(".")
    return CONTENT_TYPES_BY_EXTENSION.get(extension) if dot else None
