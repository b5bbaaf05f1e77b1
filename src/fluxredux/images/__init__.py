"""Image decoding (limits, formats, EXIF) and encoding (webp/jpg/png, quality)."""

from fluxredux.images.crop import square_reference
from fluxredux.images.decode import ACCEPTED_FORMATS, DecodeLimits, decode_image, to_rgb
from fluxredux.images.encode import CONTENT_TYPES, EXTENSIONS, encode_image
from fluxredux.images.source import parse_data_uri, to_data_uri

__all__ = [
    "ACCEPTED_FORMATS",
    "CONTENT_TYPES",
    "EXTENSIONS",
    "DecodeLimits",
    "decode_image",
    "encode_image",
    "parse_data_uri",
    "square_reference",
    "to_data_uri",
    "to_rgb",
]
