"""Time limits on receiving a request: its headers, then its body.

uvicorn closes a keep-alive connection that stays idle between requests, but it has no
limit at all on a request that is *being* received: a client that sends one byte every
few seconds (or opens a connection and sends nothing) holds that connection, its memory
and its slot in the event loop forever, and a few hundred such clients are cheap to run.
Neither uvicorn (no setting, up to 0.54) nor Starlette/FastAPI (they see a request only
once its headers are complete) can bound it, and h11 only parses, so it is written here:
a subclass of uvicorn's own h11 protocol that arms one timer per phase.

- headers: from the connection's start (or the first byte of a keep-alive request) until
  the request's line and headers are complete: ``header_timeout`` seconds. Receiving more
  bytes does not extend it, so trickling cannot.
- body: from the end of the headers until the end of the body: ``body_timeout`` seconds
  plus one second per ``body_min_rate`` bytes received (Apache's mod_reqtimeout
  ``MinRate`` rule), so a large upload over a slow but steady link still finishes while a
  trickle does not. Time during which the server itself stopped reading (flow control,
  while the app has not consumed what came) is not the client's fault and not counted.

On timeout the client gets a 408 when no answer has started, and the connection is closed.
For exposure to the internet, a reverse proxy in front does this (and more) too.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from fluxredux.config import Settings

_HEADERS = "headers"
_BODY = "body"


def _timeout_response(what: str) -> bytes:
    body = json.dumps(
        {"error": f"the request {what} did not arrive in time", "code": "request_timeout"}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _ReportingFlowControl(FlowControl):
    """uvicorn's flow control, telling the protocol when the server stops and resumes reading."""

    def __init__(self, transport: asyncio.Transport, protocol: TimeoutH11Protocol) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def pause_reading(self) -> None:
        super().pause_reading()
        self._protocol.reading_paused(True)

    def resume_reading(self) -> None:
        super().resume_reading()
        self._protocol.reading_paused(False)


class TimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with time limits on receiving headers and body.

    The limits are class attributes because uvicorn builds its protocol from a class and
    its own arguments only; ``timeout_protocol`` makes a subclass with the settings' values.
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    body_min_rate: float = 64 * 1024  # bytes per extra second; 0: no extension

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._phase_started = 0.0
        self._body_received = 0
        self._paused_since: float | None = None
        self._paused_total = 0.0

    # --- the phases ------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # a phase's deadline is never pushed back by the bytes that arrive in it
        self._cancel_timer()
        self._phase = phase
        now = self.loop.time()
        self._phase_started = now
        self._body_received = 0
        self._paused_total = 0.0
        self._paused_since = now if self.flow is not None and self.flow.read_paused else None
        if phase == _HEADERS:
            self._timer = self.loop.call_later(self.header_timeout, self._expired)
        elif phase == _BODY:
            self._timer = self.loop.call_later(self.body_timeout, self._expired)

    def _follow_state(self) -> None:
        """Which phase the connection is in now, from h11's view of the client's side."""
        if self.transport is None or self.transport.is_closing():
            self._enter(None)
            return
        their_state = self.conn.their_state
        if their_state is h11.IDLE:
            # Between requests uvicorn's keep-alive timer governs; once a byte of the
            # next request is buffered (or on a fresh connection), the headers' clock runs.
            waiting = self.conn.trailing_data[0] or self.cycle is None
            self._enter(_HEADERS if waiting else None)
        elif their_state is h11.SEND_BODY:
            self._enter(_BODY)
        else:  # DONE, MUST_CLOSE, CLOSED, ERROR: nothing more to receive
            self._enter(None)

    def _allowed(self) -> float:
        if self._phase == _HEADERS:
            return self.header_timeout
        extra = self._body_received / self.body_min_rate if self.body_min_rate > 0 else 0.0
        return self.body_timeout + extra

    def _elapsed(self, now: float) -> float:
        paused = self._paused_total + (now - self._paused_since if self._paused_since is not None else 0.0)
        return now - self._phase_started - paused

    def _expired(self) -> None:
        self._timer = None
        if self._phase is None or self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        remaining = self._allowed() - self._elapsed(now)
        if self._paused_since is not None:  # the server is the one not reading: look again later
            self._timer = self.loop.call_later(max(remaining, 1.0), self._expired)
            return
        if remaining > 0:  # extended by the body bytes received meanwhile
            self._timer = self.loop.call_later(max(remaining, 0.05), self._expired)
            return
        self._time_out()

    def _time_out(self) -> None:
        phase = self._phase or _HEADERS
        self._enter(None)
        self.logger.info("closing a connection whose request %s did not arrive in time", phase)
        cycle = self.cycle
        if phase == _HEADERS:
            # A connection that never sent a byte is closed without a word, as after a
            # keep-alive timeout: there is no request to answer.
            should_answer = bool(self.conn.trailing_data[0])
        else:
            should_answer = cycle is not None and not cycle.response_started
        if should_answer:
            self.transport.write(_timeout_response(phase))
        if cycle is not None and not cycle.response_complete:
            # The app, if it is reading this body, sees a disconnect; whatever it answers
            # afterwards goes nowhere instead of into the 408's connection.
            cycle.disconnected = True
            cycle.keep_alive = False
            cycle.message_event.set()
        self.transport.close()

    # --- uvicorn's hooks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _ReportingFlowControl(transport, self)
        self._follow_state()  # a connection that never sends a byte times out too

    def data_received(self, data: bytes) -> None:
        if self._phase == _BODY:
            self._body_received += len(data)
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next pipelined request
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._enter(None)  # the connection is no longer HTTP/1.1 request-response
        super().handle_websocket_upgrade(event)

    def reading_paused(self, paused: bool) -> None:
        """Time while the server (not the client) holds reading back is not counted."""
        now = self.loop.time()
        if paused and self._paused_since is None:
            self._paused_since = now
        elif not paused and self._paused_since is not None:
            self._paused_total += now - self._paused_since
            self._paused_since = None


def timeout_protocol(settings: Settings) -> type[TimeoutH11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, with these limits."""
    return type(
        "ConfiguredTimeoutH11Protocol",
        (TimeoutH11Protocol,),
        {
            "header_timeout": settings.header_timeout_seconds,
            "body_timeout": settings.body_timeout_seconds,
            "body_min_rate": float(settings.body_min_bytes_per_second),
        },
    )
