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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from fluxredux.api.eachlabs.shapes import Prediction, PredictionList, UploadedFile
from fluxredux.errors import FluxReduxError
from fluxredux.schema import MODEL_NAME, MODEL_VERSION

__all__ = ["ApiError", "AsyncFluxRedux", "FluxRedux"]

TERMINAL = frozenset({"success", "error", "cancelled"})
LONG_POLL = 55.0  # seconds per ?wait= request; the server allows up to 60
# Answers that mean "nothing was done; try again later". Retrying them is safe for every
# request this client sends, a create included: the server refuses a create (over a limit,
# queue full, no worker, store or disk failing) without queueing it (the insert itself is
# the capacity check), so a refused create created nothing and cannot run twice. Reads,
# uploads and cancels are idempotent anyway.
RETRY_STATUSES = frozenset({429, 503})

IDEMPOTENCY_HEADER = "Idempotency-Key"

# Replaced in tests, to count the waits without spending them.
_sleep = time.sleep
_async_sleep = asyncio.sleep


class ApiError(FluxReduxError):
    """The server answered with an error: ``status`` (HTTP), ``code`` and its message."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(
            str(body.get("error", f"HTTP {status}")), **{k: v for k, v in body.items() if k != "error"}
        )
        self.status = status
        self.code = str(body.get("code", "http_error"))


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:500] or f"HTTP {response.status_code}"}
    raise ApiError(response.status_code, body if isinstance(body, dict) else {"error": str(body)})


def _retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (delta-seconds or an HTTP date), if it has one."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _RetryBudget:
    """One call's retries: how many are left, and how many seconds may still be waited."""

    def __init__(self, retries: int, max_wait: float) -> None:
        self.retries = retries
        self.wait_left = max_wait

    def delay(self, response: httpx.Response) -> float | None:
        """Seconds to wait before sending the request again, or None to give up now.

        Only a 429/503 that says when to come back is retried: without Retry-After there is
        no telling whether a retry could succeed. A wait longer than the budget left is not
        started at all, so the caller hears at once rather than after a futile sleep."""
        if response.status_code not in RETRY_STATUSES or self.retries <= 0:
            return None
        delay = _retry_after(response)
        if delay is None or delay > self.wait_left:
            return None
        self.retries -= 1
        self.wait_left -= delay
        return delay

    def resend_lost(self) -> bool:
        """Whether a request whose answer was lost may be sent again (one retry used)."""
        if self.retries <= 0:
            return False
        self.retries -= 1
        return True


def _body(inputs: Mapping[str, Any], webhook_url: str | None, webhook_secret: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL_NAME, "version": MODEL_VERSION, "input": dict(inputs)}
    if webhook_url:
        body["webhook_url"] = webhook_url
    if webhook_secret:
        body["webhook_secret"] = webhook_secret
    return body


def _idempotency(key: str | None) -> dict[str, Any]:
    """The create's request options for an idempotency key; with one, a lost answer may be
    asked for again."""
    return {"headers": {IDEMPOTENCY_HEADER: key}, "resend_if_lost": True} if key else {}


def _upload_parts(source: Path | bytes) -> dict[str, tuple[str, bytes]]:
    if isinstance(source, Path):
        return {"file": (source.name, source.read_bytes())}
    return {"file": ("image", source)}


def _headers(api_key: str) -> dict[str, str]:
    return {"X-API-Key": api_key, "User-Agent": "fluxredux-client"}


def _references(inputs: Mapping[str, Any]) -> list[Any]:
    """Every reference image of ``inputs``: redux_image, or each of redux_images."""
    many = inputs.get("redux_images") or []
    return [inputs.get("redux_image"), *(item.get("image") for item in many if isinstance(item, Mapping))]


def _with_uploads(inputs: Mapping[str, Any], upload: Callable[[Path | bytes], str]) -> dict[str, Any]:
    """``inputs`` with each local file (a Path or bytes) among the references replaced by
    the id ``upload`` gives it: files are uploaded first, then named by id."""

    def resolved(reference: Any) -> Any:
        return upload(reference) if isinstance(reference, Path | bytes) else reference

    result = dict(inputs)
    if "redux_image" in result:
        result["redux_image"] = resolved(result["redux_image"])
    if result.get("redux_images"):
        result["redux_images"] = [
            {**item, "image": resolved(item.get("image"))} if isinstance(item, Mapping) else item
            for item in result["redux_images"]
        ]
    return result


class FluxRedux:
    """Synchronous client.

    ``retries``: how many times one call is re-sent after a 429/503 with Retry-After
    (0: never); ``max_retry_wait``: the most seconds one call spends waiting for them."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_retry_wait: float = 60.0,
        **httpx_options: Any,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout, **httpx_options
        )
        self.retries = retries
        self.max_retry_wait = max_retry_wait

    def __enter__(self) -> FluxRedux:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, url: str, *, resend_if_lost: bool = False, **kwargs: Any
    ) -> httpx.Response:
        budget = _RetryBudget(self.retries, self.max_retry_wait)
        while True:
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError:
                if not (resend_if_lost and budget.resend_lost()):
                    raise
                continue
            delay = budget.delay(response)
            if delay is None:
                _raise_for(response)
                return response
            _sleep(delay)

    def upload(self, source: Path | bytes) -> UploadedFile:
        return UploadedFile.model_validate(
            self._request("POST", "/v1/files", files=_upload_parts(source)).json()
        )

    def _inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return _with_uploads(inputs, lambda source: self.upload(source).id)

    def create(
        self,
        inputs: Mapping[str, Any],
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        body = _body(self._inputs(inputs), webhook_url, webhook_secret)
        response = self._request("POST", "/v1/prediction/", json=body, **_idempotency(idempotency_key))
        return str(response.json()["predictionID"])

    def get(self, prediction_id: str, *, wait: float = 0) -> Prediction:
        params = {"wait": wait} if wait else None
        response = self._request("GET", f"/v1/prediction/{prediction_id}", params=params, timeout=wait + 30)
        return Prediction.model_validate(response.json())

    def wait(
        self,
        prediction_id: str,
        *,
        timeout: float | None = None,
        poll: float | None = None,
        on_update: Callable[[Prediction], None] | None = None,
    ) -> Prediction:
        """Until the prediction ends: long-polls, or polls every ``poll`` s to report progress."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL if deadline is None else max(0.0, min(LONG_POLL, deadline - time.monotonic()))
            prediction = self.get(prediction_id, wait=0 if poll else left)
            if on_update is not None:
                on_update(prediction)
            if prediction.status in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
                return prediction
            if poll:
                time.sleep(poll)

    def run(
        self, inputs: Mapping[str, Any], *, timeout: float | None = None, idempotency_key: str | None = None
    ) -> Prediction:
        return self.wait(self.create(inputs, idempotency_key=idempotency_key), timeout=timeout)

    def cancel(self, prediction_id: str) -> Prediction:
        return Prediction.model_validate(
            self._request("POST", f"/v1/prediction/{prediction_id}/cancel").json()
        )

    def list(self, *, limit: int = 20, cursor: str | None = None) -> PredictionList:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return PredictionList.model_validate(self._request("GET", "/v1/prediction/", params=params).json())

    def download(self, url: str) -> bytes:
        return self._request("GET", url).content


class AsyncFluxRedux:
    """Asynchronous client: the same methods and options, awaited."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_retry_wait: float = 60.0,
        **httpx_options: Any,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout, **httpx_options
        )
        self.retries = retries
        self.max_retry_wait = max_retry_wait

    async def __aenter__(self) -> AsyncFluxRedux:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, url: str, *, resend_if_lost: bool = False, **kwargs: Any
    ) -> httpx.Response:
        budget = _RetryBudget(self.retries, self.max_retry_wait)
        while True:
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError:
                if not (resend_if_lost and budget.resend_lost()):
                    raise
                continue
            delay = budget.delay(response)
            if delay is None:
                _raise_for(response)
                return response
            await _async_sleep(delay)

    async def upload(self, source: Path | bytes) -> UploadedFile:
        response = await self._request("POST", "/v1/files", files=_upload_parts(source))
        return UploadedFile.model_validate(response.json())

    async def create(
        self,
        inputs: Mapping[str, Any],
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        sources = [ref for ref in _references(inputs) if isinstance(ref, Path | bytes)]
        uploaded = {id(source): (await self.upload(source)).id for source in sources}
        resolved = _with_uploads(inputs, lambda source: uploaded[id(source)])
        response = await self._request(
            "POST",
            "/v1/prediction/",
            json=_body(resolved, webhook_url, webhook_secret),
            **_idempotency(idempotency_key),
        )
        return str(response.json()["predictionID"])

    async def get(self, prediction_id: str, *, wait: float = 0) -> Prediction:
        params = {"wait": wait} if wait else None
        response = await self._request(
            "GET", f"/v1/prediction/{prediction_id}", params=params, timeout=wait + 30
        )
        return Prediction.model_validate(response.json())

    async def wait(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL if deadline is None else max(0.0, min(LONG_POLL, deadline - time.monotonic()))
            prediction = await self.get(prediction_id, wait=left)
            if prediction.status in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
                return prediction

    async def run(
        self, inputs: Mapping[str, Any], *, timeout: float | None = None, idempotency_key: str | None = None
    ) -> Prediction:
        return await self.wait(await self.create(inputs, idempotency_key=idempotency_key), timeout=timeout)

    async def cancel(self, prediction_id: str) -> Prediction:
        response = await self._request("POST", f"/v1/prediction/{prediction_id}/cancel")
        return Prediction.model_validate(response.json())

    async def download(self, url: str) -> bytes:
        return (await self._request("GET", url)).content
