"""Turning a ``redux_image`` reference into bytes, for the sources that need no network.

http(s) URLs are fetched by the server with its own safety rules; uploaded file ids are
resolved by the server's file store.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from fluxredux.errors import ImageError


def parse_data_uri(uri: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:[<mediatype>][;base64],<data>`` URI."""
    if not uri[:5].lower() == "data:":
        raise ImageError("image_bad_data_uri", "not a data: URI")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageError("image_bad_data_uri", "the data: URI has no ',' before its data")
    # base64 is 4 characters per 3 bytes: refuse oversized payloads before decoding them.
    if len(payload) > (max_bytes // 3 + 1) * 4 + 4:
        raise ImageError(
            "image_too_large",
            f"the data: URI holds more than the {max_bytes:,}-byte limit",
            limit_bytes=max_bytes,
        )
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError("image_bad_data_uri", "the data: URI's base64 payload is invalid") from exc
    return urllib.parse.unquote_to_bytes(payload)


def to_data_uri(data: bytes, content_type: str = "application/octet-stream") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"
