"""The synchronous client: the shared core (core.py) sent over an httpx.Client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from fluxredux.api.eachlabs.shapes import LoraList, Prediction, PredictionList, StreamEvent, UploadedFile
from fluxredux.client import core
from fluxredux.client.core import Call, ClientBase, CreateOptions, Scale, UpscaleOptions, Waiting

if TYPE_CHECKING:  # only in annotations, which are never evaluated
    from typing_extensions import Unpack

T = TypeVar("T")

# Every wait of this client (retry pauses, polling) goes through this name, so a test can
# count the waits without spending them.
_sleep = time.sleep


class FluxRedux(ClientBase[httpx.Client]):
    """Synchronous client.

    ``retries``: how many times one call is re-sent after a 429/503 with Retry-After
    (0: never, nor after a lost connection); ``max_retry_wait``: the most seconds one call
    spends waiting for them, and how long a read (``get``, each long-poll of ``wait``,
    ``list``, ``download``) or a keyed create that loses its connection (server down or
    restarting, its node killed mid long-poll) keeps being re-sent, with backoff (at once,
    then 0.5 s doubling up to 5 s a pause), before it raises ConnectionLost."""

    def _open(self, **options: Any) -> httpx.Client:
        return httpx.Client(**options)

    def __enter__(self) -> FluxRedux:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T], max_retry_wait: float | None = None) -> T:
        exchange = self._exchange(call, max_retry_wait)
        while (delay := exchange.after(self._try(call))) is not None:
            _sleep(delay)
        return exchange.result()

    def _try(self, call: Call[Any]) -> httpx.Response | httpx.TransportError:
        try:
            return self._http.request(call.method, call.url, **call.options)
        except httpx.TransportError as exc:  # the exchange decides: resend (when, how often), or raise
            return exc

    def upload(self, source: Path | bytes) -> UploadedFile:
        return self._send(core.upload_call(source))

    def create(self, inputs: Mapping[str, Any], **options: Unpack[CreateOptions]) -> str:
        """Create a prediction (local files among the references uploaded first); its id.

        ``webhook_url``/``webhook_secret``: where to post its end; ``idempotency_key``: a
        repeat with the same key gets this prediction, so a lost answer is asked again."""
        plan = core.create_plan(inputs, **options)
        return self._send(plan.call([self.upload(source).id for source in plan.files]))

    def upscale(
        self, prediction_id: str, index: int = 0, scale: Scale = 2, **options: Unpack[UpscaleOptions]
    ) -> str:
        """Create a final from output ``index`` of the finished draft ``prediction_id``, its
        sides ``scale`` (2 or 4) times the draft's, refined under the draft's own references,
        prompt and seed; its id (follow it with ``wait``, as a create's).

        ``options``: the final's settings (``upscale_strength``, ``seed``, ``num_outputs``,
        ``output_format``, ``output_quality``, ``num_inference_steps``,
        ``disable_safety_checker``) and ``idempotency_key``, as ``create`` takes it."""
        return self._send(core.upscale_call(prediction_id, index, scale, **options))

    def get(self, prediction_id: str, *, wait: float = 0) -> Prediction:
        return self._send(core.get_call(prediction_id, wait))

    def wait(
        self,
        prediction_id: str,
        *,
        timeout: float | None = None,
        poll: float | None = None,
        on_update: Callable[[Prediction], None] | None = None,
    ) -> Prediction:
        """Until the prediction ends: long-polls, or polls every ``poll`` s to report progress.

        A long-poll whose node dies (or a poll that finds the server down) is re-sent as
        any read is, within ``max_retry_wait`` and never past ``timeout``; so a server
        restart, or another node behind a balancer, takes the wait over."""
        waiting = Waiting(timeout, poll)
        while True:
            call = core.get_call(prediction_id, waiting.hold())
            prediction = self._send(call, waiting.retry_wait(self.max_retry_wait))
            if on_update is not None:
                on_update(prediction)
            if waiting.over(prediction):
                return prediction
            if poll:
                _sleep(poll)

    def run(
        self, inputs: Mapping[str, Any], *, timeout: float | None = None, idempotency_key: str | None = None
    ) -> Prediction:
        return self.wait(self.create(inputs, idempotency_key=idempotency_key), timeout=timeout)

    def cancel(self, prediction_id: str) -> Prediction:
        return self._send(core.cancel_call(prediction_id))

    def stream(self, prediction_id: str) -> Iterator[StreamEvent]:
        """The prediction's events as they happen (queued, started, step, phase, preview),
        ending with its end (done, failed or canceled: ``event.prediction``). A lost
        connection is taken up again after the last event received (Last-Event-ID), within
        ``max_retry_wait`` of it; so no step is missed across a server restart."""
        reconnects = core.Reconnects(core.stream_call(prediction_id), self.max_retry_wait)
        last: str | None = None
        while True:
            url, stream_headers = core.stream_request(prediction_id, last)
            try:
                timeout = httpx.Timeout(self._http.timeout.connect, read=core.STREAM_SILENCE)
                with self._http.stream("GET", url, headers=stream_headers, timeout=timeout) as response:
                    if response.status_code != 200:
                        response.read()
                        core.raise_for(response)
                    decoder = core.StreamDecoder()
                    for line in response.iter_lines():
                        if (event := decoder.feed(line)) is None:
                            continue
                        last = event.id
                        reconnects.heard()
                        yield event
                        if event.ended:
                            return
                raise httpx.RemoteProtocolError("the stream closed before the prediction ended")
            except httpx.TransportError as loss:
                _sleep(reconnects.lost(loss))

    def list(self, *, limit: int = 20, cursor: str | None = None) -> PredictionList:
        return self._send(core.list_call(limit, cursor))

    def loras(self) -> LoraList:
        """The style adapters (LoRA) this server offers: names for ``loras`` in an input."""
        return self._send(core.loras_call())

    def download(self, url: str) -> bytes:
        return self._send(core.download_call(url))
