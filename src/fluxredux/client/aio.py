"""The asynchronous client: the shared core (core.py) sent over an httpx.AsyncClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from fluxredux.api.eachlabs.shapes import LoraList, Prediction, StreamEvent, UploadedFile
from fluxredux.client import core
from fluxredux.client.core import Call, ClientBase, CreateOptions, Scale, UpscaleOptions, Waiting

if TYPE_CHECKING:  # only in annotations, which are never evaluated
    from typing_extensions import Unpack

T = TypeVar("T")

# Every wait of this client (retry pauses) goes through this name, so a test can count
# the waits without spending them.
_sleep = asyncio.sleep


class AsyncFluxRedux(ClientBase[httpx.AsyncClient]):
    """Asynchronous client: the same methods and options, awaited (all but ``list``, and
    ``wait`` without ``poll``/``on_update``: it long-polls only)."""

    def _open(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    async def __aenter__(self) -> AsyncFluxRedux:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T], max_retry_wait: float | None = None) -> T:
        exchange = self._exchange(call, max_retry_wait)
        while (delay := exchange.after(await self._try(call))) is not None:
            await _sleep(delay)
        return exchange.result()

    async def _try(self, call: Call[Any]) -> httpx.Response | httpx.TransportError:
        try:
            return await self._http.request(call.method, call.url, **call.options)
        except httpx.TransportError as exc:  # the exchange decides: resend (when, how often), or raise
            return exc

    async def stream(self, prediction_id: str) -> AsyncIterator[StreamEvent]:
        """As FluxRedux.stream: ``async for event in client.stream(id)``."""
        reconnects = core.Reconnects(core.stream_call(prediction_id), self.max_retry_wait)
        last: str | None = None
        while True:
            url, stream_headers = core.stream_request(prediction_id, last)
            try:
                timeout = httpx.Timeout(self._http.timeout.connect, read=core.STREAM_SILENCE)
                async with self._http.stream("GET", url, headers=stream_headers, timeout=timeout) as response:
                    if response.status_code != 200:
                        await response.aread()
                        core.raise_for(response)
                    decoder = core.StreamDecoder()
                    async for line in response.aiter_lines():
                        if (event := decoder.feed(line)) is None:
                            continue
                        last = event.id
                        reconnects.heard()
                        yield event
                        if event.ended:
                            return
                raise httpx.RemoteProtocolError("the stream closed before the prediction ended")
            except httpx.TransportError as loss:
                await _sleep(reconnects.lost(loss))

    async def upload(self, source: Path | bytes) -> UploadedFile:
        return await self._send(core.upload_call(source))

    async def create(self, inputs: Mapping[str, Any], **options: Unpack[CreateOptions]) -> str:
        """As FluxRedux.create."""
        plan = core.create_plan(inputs, **options)
        return await self._send(plan.call([(await self.upload(source)).id for source in plan.files]))

    async def upscale(
        self, prediction_id: str, index: int = 0, scale: Scale = 2, **options: Unpack[UpscaleOptions]
    ) -> str:
        """As FluxRedux.upscale."""
        return await self._send(core.upscale_call(prediction_id, index, scale, **options))

    async def get(self, prediction_id: str, *, wait: float = 0) -> Prediction:
        return await self._send(core.get_call(prediction_id, wait))

    async def wait(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        """As FluxRedux.wait (a long-poll whose node dies is re-sent the same way)."""
        waiting = Waiting(timeout)
        while True:
            call = core.get_call(prediction_id, waiting.hold())
            prediction = await self._send(call, waiting.retry_wait(self.max_retry_wait))
            if waiting.over(prediction):
                return prediction

    async def run(
        self, inputs: Mapping[str, Any], *, timeout: float | None = None, idempotency_key: str | None = None
    ) -> Prediction:
        return await self.wait(await self.create(inputs, idempotency_key=idempotency_key), timeout=timeout)

    async def cancel(self, prediction_id: str) -> Prediction:
        return await self._send(core.cancel_call(prediction_id))

    async def loras(self) -> LoraList:
        """The style adapters (LoRA) this server offers: names for ``loras`` in an input."""
        return await self._send(core.loras_call())

    async def download(self, url: str) -> bytes:
        return await self._send(core.download_call(url))
