"""Python client for a fluxredux server (or any flux-redux-schnell-compatible API).

    from fluxredux.client import FluxRedux
    client = FluxRedux("http://127.0.0.1:8000", api_key="fr_...")
    prediction = client.run({"redux_image": Path("photo.jpg"), "aspect_ratio": "16:9"})
    print(prediction.output)

A request answered 429 (over a limit) or 503 (busy, or no worker yet) with a Retry-After
header is sent again after that many seconds: at most ``retries`` times (default 3) and
at most ``max_retry_wait`` seconds waited in all (default 60) per call; ``retries=0``
turns this off. Then the last answer raises ApiError as any other error does.

A read (``get``, each long-poll of ``wait`` and ``run``, ``list``, ``download``) whose
connection is lost (refused or timed out: the server down or restarting; dropped before
the answer: its node killed mid long-poll) is sent again, at once and then after 0.5 s,
1 s, 2 s, 4 s, 5 s, 5 s...: a read does no work, so the resend, to the restarted server
or to any node behind the balancer, is safe. It gives up ``max_retry_wait`` seconds after
the first loss (and ``wait`` at its ``timeout``), raising ConnectionLost (an
httpx.TransportError too) with the last loss as its cause; ``retries=0`` turns this off
too. An upload, a cancel or a create is not sent again after a lost connection (the
create may have queued the prediction: its loss is raised at once), except a create with
an idempotency key:

``create(..., idempotency_key="order-42")`` (and ``run``) sends an ``Idempotency-Key``: the
server answers a repeated create with that key with the prediction the first one made
(for 24 h). So such a create is re-sent as a read is when its connection was lost (the
request refused, or its answer lost after it went out): the retry can only find the
prediction the lost answer named, never make a second one.

A draft made small and fast can be made a final: ``client.upscale(draft_id, index=0,
scale=2)`` creates a prediction that resizes that output to twice its sides (or 4x) and
refines it under the draft's own references, prompt and seed; it returns the new id, to
``wait`` for as any other. A prompt alone (``create({"prompt": "..."})``, no reference) is
a text-to-image prediction; ``width`` and ``height`` give a custom size.

The server's URL is its base ("http://127.0.0.1:8000"): one copied with an API path or a
docs page at its end ("http://host:8000/v1", ".../v1/prediction/", ".../docs") is used
without it, with a logged warning saying so (``client.base_url`` is what is used); one
that cannot be a server's URL (no http(s)://, a query) raises ServerUrlError.

Imports only httpx, pydantic and fluxredux.schema/errors: no torch, no server code.
core.py builds the requests and reads the answers (no I/O); sync.py (FluxRedux) and
aio.py (AsyncFluxRedux) only send them and wait, each its own way.
"""

from __future__ import annotations

from fluxredux.client.aio import AsyncFluxRedux
from fluxredux.client.core import ApiError, ConnectionLost, ServerUrlError
from fluxredux.client.sync import FluxRedux

__all__ = ["ApiError", "AsyncFluxRedux", "ConnectionLost", "FluxRedux", "ServerUrlError"]
