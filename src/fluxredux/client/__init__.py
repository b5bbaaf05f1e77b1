"""Python client for a fluxredux server (or any flux-redux-schnell-compatible API).

    from fluxredux.client import FluxRedux
    client = FluxRedux("http://127.0.0.1:8000", api_key="fr_...")
    prediction = client.run({"redux_image": Path("photo.jpg"), "aspect_ratio": "16:9"})
    print(prediction.output)

A request answered 429 (over a limit) or 503 (busy, or no worker yet) with a Retry-After
header is sent again after that many seconds: at most ``retries`` times (default 3) and
at most ``max_retry_wait`` seconds waited in all (default 60) per call; ``retries=0``
turns this off. Then the last answer raises ApiError as any other error does.

``create(..., idempotency_key="order-42")`` (and ``run``) sends an ``Idempotency-Key``: the
server answers a repeated create with that key with the prediction the first one made
(for 24 h). So such a create is also sent again when its answer was lost (the connection
dropped or timed out after the request went out), within the same ``retries``: the
retry can only find the prediction the lost answer named, never make a second one.

Imports only httpx, pydantic and fluxredux.schema/errors: no torch, no server code.
core.py builds the requests and reads the answers (no I/O); sync.py (FluxRedux) and
aio.py (AsyncFluxRedux) only send them and wait, each its own way.
"""

from __future__ import annotations

from fluxredux.client.aio import AsyncFluxRedux
from fluxredux.client.core import ApiError
from fluxredux.client.sync import FluxRedux

__all__ = ["ApiError", "AsyncFluxRedux", "FluxRedux"]
