"""How webhooks are signed: one scheme per HTTP surface.

Eachlabs surface: ``X-FluxRedux-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``
with ``X-FluxRedux-Timestamp: <unix seconds>`` and ``X-FluxRedux-Delivery: <prediction id>``
(``sign``; ``verify`` is what a receiver does).

Replicate surface: Standard Webhooks (https://www.standardwebhooks.com), as Replicate signs its
webhooks: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64
HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``, made by the ``standardwebhooks``
package (receivers verify with the same package: ``Webhook(secret).verify(body, headers)``).

The secret of the Replicate-compatible surface is one per API key, derived from the key
(so every API node finds the same one without storing it, and a new key means a new
secret): ``whsec_`` + base64 of HMAC-SHA256(API key, a fixed label). A caller reads it
with ``GET /v1/webhooks/default/secret``; each prediction keeps the secret it was created
with, so a delivery after a key was rotated still verifies with the key's old secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime, timezone

from standardwebhooks import Webhook

SIGNATURE_HEADER = "X-FluxRedux-Signature"
TIMESTAMP_HEADER = "X-FluxRedux-Timestamp"
DELIVERY_HEADER = "X-FluxRedux-Delivery"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The Eachlabs surface's signature of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: float = 300) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps (replays)."""
    if abs(time.time() - float(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


SECRET_PREFIX = "whsec_"
_LABEL = b"fluxredux webhook signing secret v1"


def signing_secret(api_key: str) -> str:
    """The Standard Webhooks secret of deliveries for predictions made with ``api_key``."""
    derived = hmac.new(api_key.encode(), _LABEL, hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(derived).decode()


def signed_headers(secret: str, message_id: str, body: bytes, sent_at: float) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``, sent now (``sent_at``, unix s)."""
    timestamp = datetime.fromtimestamp(int(sent_at), tz=timezone.utc)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(sent_at)),
        "webhook-signature": Webhook(secret).sign(message_id, timestamp, body.decode()),
    }
