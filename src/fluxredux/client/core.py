"""What the sync and async clients share, none of it doing I/O.

Each public method of the two clients is one thin shell: it asks this module for the
request to send (a ``Call``: method, URL, httpx options, how its answer is read), sends
it with its own httpx client, feeds each try's outcome to an ``Exchange`` (the retry
policy: send again, after how long, or stop), sleeps its own way, and returns what the
call reads from the answer. So URLs, bodies, headers, retries (after a 429/503, and after
a lost connection), errors and parsing are written once, here, and only the sending and
the sleeping are written twice.

The inputs are not checked against fluxredux.schema.PredictionInput here: the server
checks them, and answers a bad one with a 400 that becomes an ApiError (the CLI's
``run`` checks its flags before it calls).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeGuard, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel

from fluxredux.api.eachlabs.shapes import LoraList, Prediction, PredictionList, StreamEvent, UploadedFile
from fluxredux.errors import ClientError, FluxReduxError
from fluxredux.schema import MODEL_NAME, MODEL_VERSION

if TYPE_CHECKING:  # only in annotations, which are never evaluated (typing has it from 3.11 on)
    from typing_extensions import Unpack

T = TypeVar("T")
Shape = TypeVar("Shape", bound=BaseModel)
Http = TypeVar("Http")

TERMINAL = frozenset({"success", "error", "cancelled"})
LONG_POLL = 55.0  # seconds per ?wait= request; the server allows up to 60
# Answers that mean "nothing was done; try again later". Retrying them is safe for every
# request this client sends, a create included: the server refuses a create (over a limit,
# queue full, no worker, store or disk failing) without queueing it (the insert itself is
# the capacity check), so a refused create created nothing and cannot run twice. Reads,
# uploads and cancels are idempotent anyway.
RETRY_STATUSES = frozenset({429, 503})
# Losses a call that may be re-sent (``Call.resend_if_lost``) is re-sent after: the request
# never reached a server (connect refused or timed out: the node is down, or restarting),
# or its answer never came back (the node died mid-request, a long-poll included, or went
# silent past the read timeout). Not the losses a resend would only meet again: a
# malformed URL or request (UnsupportedProtocol, LocalProtocolError), a proxy's refusal
# (ProxyError), or this client's own connection pool staying full (PoolTimeout).
RESENDABLE_LOSSES: tuple[type[httpx.TransportError], ...] = (
    httpx.NetworkError,  # ConnectError, ReadError, WriteError, CloseError
    httpx.RemoteProtocolError,  # "Server disconnected without sending a response"
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
)
# The pauses between those resends: the first at once (another node, or a fresh
# connection, may answer right away), then 0.5 s, doubling up to 5 s a pause, for as long
# as the call's retry time allows (``max_retry_wait``, counted from its first loss).
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 5.0

IDEMPOTENCY_HEADER = "Idempotency-Key"

log = logging.getLogger(__name__)


class ApiError(FluxReduxError):
    """The server answered with an error: ``status`` (HTTP), ``code`` and its message."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(
            str(body.get("error", f"HTTP {status}")), **{k: v for k, v in body.items() if k != "error"}
        )
        self.status = status
        self.code = str(body.get("code", "http_error"))


class ConnectionLost(FluxReduxError, httpx.TransportError):
    """A call that may be re-sent (a read, or a create with an idempotency key) lost its
    connection on every try until its retry time (``max_retry_wait``) ran out: the server
    stayed unreachable. ``__cause__`` is the last loss (an httpx.TransportError); this is
    one too, so code that catches httpx's errors still catches it."""

    code = "connection_lost"

    def __init__(self, call: Call[Any], last: httpx.TransportError, tries: int, seconds: float) -> None:
        try:
            request: httpx.Request | None = last.request
        except RuntimeError:  # the loss came without its request
            request = None
        url = call.url if request is None else str(request.url)
        super().__init__(
            f"{call.method} {url}: no answer in {tries} tries over {seconds:.1f} s (the connection "
            f"was lost each time); giving up. Last: {type(last).__name__}: {str(last) or 'no message'}",
            tries=tries,
            seconds=round(seconds, 1),
        )
        if request is not None:
            self.request = request


class ServerUrlError(ClientError, ValueError):
    """What was given as the server's URL is not one (no http(s) scheme or no host, or a
    query or fragment); the message says what to pass."""

    code = "bad_server_url"


# --- the server's URL: its base, to which every call's path is added

# Where the API's own paths begin: a URL copied from the API docs or from a request
# ("http://host:8000/v1", ".../v1/prediction/") ends in one, and the calls add it again
# (".../v1/v1/prediction/": a 404 that says nothing of why). What comes before it is kept:
# a server behind a proxy may live under a prefix ("https://example.com/fluxredux").
API_ROOT = "v1"
# The server's documentation pages, the other URL people copy from.
DOC_PAGES = frozenset({"docs", "redoc", "openapi.json"})
EXAMPLE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ServerUrl:
    """The server's base URL (``base``), made from what was ``given``."""

    base: str
    given: str

    @property
    def note(self) -> str | None:
        """One line saying what was corrected, when something was (a trailing slash is not)."""
        if self.base == self.given.rstrip("/"):
            return None
        return f"using the server's base URL {self.base}, not {self.given} (the API paths are added to it)"


def server_url(given: str) -> ServerUrl:
    """``given`` as the server's base URL, an API path or a docs page at its end taken off;
    a ServerUrlError when it cannot be a server's URL at all."""
    given = given.strip()
    parts = urlsplit(given)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ServerUrlError(
            f"{given!r} is not a server URL: pass the server's base URL, e.g. {_example(given)}"
        )
    path = _base_path(parts.path)
    # A query or a fragment goes with the API path or docs page it follows (the docs'
    # "/docs#/prediction/..."); on a base URL it is a mistake of some other kind.
    if (parts.query or parts.fragment) and path == parts.path.rstrip("/"):
        raise ServerUrlError(
            f"{given!r} has a query or a fragment: pass the server's base URL alone, e.g. {EXAMPLE_URL}"
        )
    return ServerUrl(urlunsplit((parts.scheme, parts.netloc, path, "", "")), given)


def _base_path(path: str) -> str:
    segments = [segment for segment in path.split("/") if segment]
    if API_ROOT in segments:
        # The last one: a proxy's own prefix may hold another.
        segments = segments[: len(segments) - 1 - segments[::-1].index(API_ROOT)]
    elif segments and segments[-1] in DOC_PAGES:
        segments = segments[:-1]
    return "".join("/" + segment for segment in segments)


def _example(given: str) -> str:
    """The URL to suggest: ``given`` with the scheme it lacks ("127.0.0.1:8000"), when that
    makes one; else a typical one."""
    if given and "://" not in given and not any(c.isspace() for c in given):
        guess = urlsplit(f"http://{given}")
        if guess.hostname and not guess.query and not guess.fragment:
            return urlunsplit(("http", guess.netloc, _base_path(guess.path), "", ""))
    return EXAMPLE_URL


class CreateOptions(TypedDict, total=False):
    """What ``create`` takes besides the inputs (one definition for both clients)."""

    webhook_url: str | None
    webhook_secret: str | None
    idempotency_key: str | None


class UpscaleOptions(TypedDict, total=False):
    """What ``upscale`` takes besides the draft, its output and the scale: the final's own
    settings (each absent one is the server's default: the draft's seed, strength 0.35...),
    and an idempotency key as ``create`` takes it."""

    upscale_strength: float
    seed: int | None
    num_outputs: int
    output_format: Literal["webp", "jpg", "png"]
    output_quality: int
    num_inference_steps: int
    disable_safety_checker: bool
    idempotency_key: str | None


Scale = Literal[2, 4]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request plan: what to send, and how its successful answer is read."""

    method: str
    url: str
    read: Callable[[httpx.Response], T]
    options: Mapping[str, Any] = field(default_factory=dict)  # for httpx's request(): json, params...
    # Whether a try whose connection was lost (refused, or dropped after the request went
    # out and before its answer came back) may be sent again: only when a resend cannot do
    # the work twice: a read (it does no work), a create with an idempotency key (a resend
    # finds the first one's prediction).
    resend_if_lost: bool = False


# --- the calls, one per client method


def _as(shape: type[Shape]) -> Callable[[httpx.Response], Shape]:
    return lambda response: shape.model_validate(response.json())


def _prediction_id(response: httpx.Response) -> str:
    return str(response.json()["predictionID"])


def _content(response: httpx.Response) -> bytes:
    return response.content


def upload_call(source: Path | bytes) -> Call[UploadedFile]:
    name, data = (source.name, source.read_bytes()) if isinstance(source, Path) else ("image", source)
    return Call("POST", "/v1/files", _as(UploadedFile), {"files": {"file": (name, data)}})


@dataclass(frozen=True)
class CreatePlan:
    """A create in two steps: upload ``files`` (the local files among the references),
    then send ``call`` with the ids they were uploaded as."""

    inputs: Mapping[str, Any]
    options: CreateOptions

    @property
    def files(self) -> list[Path | bytes]:
        return local_files(self.inputs)

    def call(self, uploaded: Sequence[str]) -> Call[str]:
        body: dict[str, Any] = {
            "model": MODEL_NAME,
            "version": MODEL_VERSION,
            "input": with_ids(self.inputs, uploaded),
        }
        if self.options.get("webhook_url"):
            body["webhook_url"] = self.options["webhook_url"]
        if self.options.get("webhook_secret"):
            body["webhook_secret"] = self.options["webhook_secret"]
        return _create_call("/v1/prediction/", body, self.options.get("idempotency_key"))


def _create_call(url: str, body: Mapping[str, Any], key: str | None) -> Call[str]:
    """A POST that creates a prediction and answers its id (a create, an upscale)."""
    if not key:
        return Call("POST", url, _prediction_id, {"json": body})
    # With a key, the server answers a repeat with the first create's prediction, so a
    # create whose answer was lost may be asked for again.
    options = {"json": body, "headers": {IDEMPOTENCY_HEADER: key}}
    return Call("POST", url, _prediction_id, options, resend_if_lost=True)


def _check_keywords(method: str, given: Mapping[str, Any], allowed: frozenset[str]) -> None:
    # The clients take these as **options: a misspelt one must still fail as a keyword
    # argument does, and before anything is uploaded or sent.
    unknown = sorted(given.keys() - allowed)
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")


def create_plan(inputs: Mapping[str, Any], **options: Unpack[CreateOptions]) -> CreatePlan:
    _check_keywords("create", options, CreateOptions.__optional_keys__)
    return CreatePlan(inputs, options)


def upscale_call(
    prediction_id: str, index: int, scale: Scale, **options: Unpack[UpscaleOptions]
) -> Call[str]:
    """A final from output ``index`` of the draft ``prediction_id`` (one of the caller's own
    finished predictions), its sides ``scale`` times the draft's: the shortcut route for a
    create with ``upscale_from``. The fields left out (or None) are not sent, so the server
    takes them from the draft (its seed) or from its defaults."""
    _check_keywords("upscale", options, UpscaleOptions.__optional_keys__)
    fields = {name: value for name, value in options.items() if name != "idempotency_key"}
    body = {"index": index, "scale": scale, **{k: v for k, v in fields.items() if v is not None}}
    # Quoted whole: an id is never a path of its own (a "/" in it would reach another route).
    url = f"/v1/prediction/{quote(prediction_id, safe='')}/upscale"
    return _create_call(url, body, options.get("idempotency_key"))


def get_call(prediction_id: str, wait: float) -> Call[Prediction]:
    # The server holds a ?wait= request up to that long: the timeout leaves room for it.
    # A read, the long-poll included: re-sent, to whichever node answers, if its node dies.
    params = {"wait": wait} if wait else None
    options = {"params": params, "timeout": wait + 30}
    return Call("GET", f"/v1/prediction/{prediction_id}", _as(Prediction), options, resend_if_lost=True)


def cancel_call(prediction_id: str) -> Call[Prediction]:
    return Call("POST", f"/v1/prediction/{prediction_id}/cancel", _as(Prediction))


def list_call(limit: int, cursor: str | None) -> Call[PredictionList]:
    params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    return Call("GET", "/v1/prediction/", _as(PredictionList), {"params": params}, resend_if_lost=True)


def loras_call() -> Call[LoraList]:
    """The style adapters (LoRA) the server offers: what ``loras`` may name."""
    return Call("GET", "/v1/loras", _as(LoraList), resend_if_lost=True)


def download_call(url: str) -> Call[bytes]:
    return Call("GET", url, _content, resend_if_lost=True)


# --- event streams


def stream_request(prediction_id: str, last_event_id: str | None) -> tuple[str, dict[str, str]]:
    """The URL and headers of a stream's connection (``last_event_id``: resume after it)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return f"/v1/prediction/{quote(prediction_id, safe='')}/stream", headers


# A stream that hears nothing (not even a keep-alive, every 15 s) for this long is lost.
STREAM_SILENCE = 45.0


class StreamDecoder:
    """The lines of a text/event-stream, as events. Written here rather than taken from a
    library: it is twenty lines, and httpx-sse would be a dependency of the client for them."""

    def __init__(self) -> None:
        self._name = "message"
        self._id = ""
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        """One line (without its end); the event it completes, if any."""
        if not line:
            data, self._data = self._data, []
            name, self._name = self._name, "message"
            if not data:
                return None
            fields = json.loads("\n".join(data))
            if name in ("done", "failed", "canceled"):
                fields = {"prediction": fields}
            return StreamEvent.model_validate({"event": name, "id": self._id, **fields})
        field_name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field_name == "event":
            self._name = value
        elif field_name == "id":
            self._id = value
        elif field_name == "data":
            self._data.append(value)
        return None  # a comment (keep-alive), or a field this client has no use for


class Reconnects:
    """A stream's reconnections after lost connections: at once, then 0.5 s doubling up to
    5 s, until ``max_wait`` s have passed since the last event (ConnectionLost)."""

    def __init__(self, call: Call[Any], max_wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.call, self.max_wait, self.clock = call, max_wait, clock
        self._losses = 0
        self._since = clock()

    def heard(self) -> None:
        self._losses = 0
        self._since = self.clock()

    def lost(self, loss: httpx.TransportError) -> float:
        """The pause before reconnecting; raises ConnectionLost when there is no time left."""
        if not isinstance(loss, RESENDABLE_LOSSES):
            raise loss
        now = self.clock()
        pause = 0.0 if not self._losses else min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** (self._losses - 1))
        self._losses += 1
        if now + pause - self._since > self.max_wait:
            raise ConnectionLost(self.call, loss, self._losses, now - self._since) from loss
        return pause


def stream_call(prediction_id: str) -> Call[None]:
    """What ConnectionLost names for a stream (the stream is sent by the clients themselves)."""
    return Call("GET", stream_request(prediction_id, None)[0], lambda response: None)


# --- local files among the references: uploaded first, then named by id


def _is_local(reference: Any) -> TypeGuard[Path | bytes]:
    return isinstance(reference, Path | bytes)


def local_files(inputs: Mapping[str, Any]) -> list[Path | bytes]:
    """The local files (a Path or bytes) among the references of ``inputs`` (redux_image,
    then each of redux_images), in the order ``with_ids`` replaces them."""
    many = inputs.get("redux_images") or []
    references = [inputs.get("redux_image"), *(i.get("image") for i in many if isinstance(i, Mapping))]
    return [reference for reference in references if _is_local(reference)]


def with_ids(inputs: Mapping[str, Any], ids: Sequence[str]) -> dict[str, Any]:
    """``inputs`` with each local file among the references replaced, in order, by the id
    it was uploaded as."""
    next_id: Iterator[str] = iter(ids)

    def resolved(reference: Any) -> Any:
        return next(next_id) if _is_local(reference) else reference

    result = dict(inputs)
    if "redux_image" in result:
        result["redux_image"] = resolved(result["redux_image"])
    if result.get("redux_images"):
        result["redux_images"] = [
            {**item, "image": resolved(item.get("image"))} if isinstance(item, Mapping) else item
            for item in result["redux_images"]
        ]
    return result


# --- answers: retried, raised or read


def raise_for(response: httpx.Response) -> None:
    """An error answer as an ApiError (its JSON body, or the start of its text)."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:500] or f"HTTP {response.status_code}"}
    raise ApiError(response.status_code, body if isinstance(body, dict) else {"error": str(body)})


def retry_after(response: httpx.Response) -> float | None:
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


class Exchange(Generic[T]):
    """One call's tries, under the retry policy: fed each try's outcome, ``after`` says how
    many seconds to wait before sending the call again, or None when there is no next
    try; then ``result`` is what the call reads from the answer.

    Two kinds of resend, both off with ``retries=0``:

    * after a 429/503 with Retry-After, any call: at most ``retries`` of them, and at
      most ``max_wait`` seconds waited for them in all;
    * after a lost connection (RESENDABLE_LOSSES), only a call with ``resend_if_lost``:
      the first at once, then after 0.5 s, 1 s, 2 s, 4 s, 5 s, 5 s... until ``max_wait``
      seconds have passed since the first loss (``clock``), so however slowly each try
      fails; then ConnectionLost. Not counted against ``retries``: a node restarting
      takes seconds, not tries."""

    def __init__(
        self, call: Call[T], retries: int, max_wait: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.call = call
        self.retries = retries
        self.wait_left = max_wait
        self.clock = clock
        self.resend_losses = call.resend_if_lost and retries > 0
        self.tries = 0
        self._losses = 0  # resends after a loss so far
        self._first_loss: float | None = None
        self._give_up_at = 0.0  # set at the first loss
        self._answer: httpx.Response | None = None

    def after(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """The delay before the next try, or None: the answer is in (else this raises:
        an ApiError for an error answer, the transport error for a loss not resent, or
        ConnectionLost for losses resent until the retry time ran out)."""
        self.tries += 1
        if isinstance(outcome, httpx.TransportError):
            return self._after_loss(outcome)
        delay = self._delay(outcome)
        if delay is None:
            raise_for(outcome)
            self._answer = outcome
        return delay

    def _delay(self, response: httpx.Response) -> float | None:
        """Only a 429/503 that says when to come back is retried: without Retry-After there
        is no telling whether a retry could succeed. A wait longer than the budget left is
        not started at all, so the caller hears at once rather than after a futile sleep."""
        if response.status_code not in RETRY_STATUSES or self.retries <= 0:
            return None
        delay = retry_after(response)
        if delay is None or delay > self.wait_left:
            return None
        self.retries -= 1
        self.wait_left -= delay
        return delay

    def _after_loss(self, loss: httpx.TransportError) -> float:
        if not (self.resend_losses and isinstance(loss, RESENDABLE_LOSSES)):
            raise loss
        now = self.clock()
        if self._first_loss is None:
            self._first_loss = now
            self._give_up_at = now + max(0.0, self.wait_left)
        delay = 0.0
        if self._losses:
            delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** (self._losses - 1), self._give_up_at - now)
            if delay <= 0:
                raise ConnectionLost(self.call, loss, self.tries, now - self._first_loss) from loss
        self._losses += 1
        self.wait_left -= delay
        return delay

    def result(self) -> T:
        if self._answer is None:
            raise RuntimeError("Exchange.result() before after() said the answer is in")
        return self.call.read(self._answer)


class Waiting:
    """One ``wait`` call's clock: how long each get asks the server to hold its answer
    (long poll; none when polling), and when the wait is over."""

    def __init__(self, timeout: float | None, poll: float | None = None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.poll = poll

    def hold(self) -> float:
        if self.poll:
            return 0
        return (
            LONG_POLL if self.deadline is None else max(0.0, min(LONG_POLL, self.deadline - time.monotonic()))
        )

    def retry_wait(self, max_retry_wait: float) -> float:
        """How long a get of this wait may spend retrying: the client's bound, but not past
        the wait's own deadline (``wait(timeout=...)`` gives up at about that time even
        when the server is down)."""
        if self.deadline is None:
            return max_retry_wait
        return max(0.0, min(max_retry_wait, self.deadline - time.monotonic()))

    def over(self, prediction: Prediction) -> bool:
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        return prediction.status in TERMINAL or timed_out


def headers(api_key: str) -> dict[str, str]:
    return {"X-API-Key": api_key, "User-Agent": "fluxredux-client"}


class ClientBase(Generic[Http]):
    """What both clients take and keep (the options are told in FluxRedux's docstring);
    each opens its own kind of httpx client (``_open``).

    ``base_url`` is the server's: one copied with an API path or a docs page at its end
    ("http://host:8000/v1") is used without it (``self.base_url``, with a logged warning
    saying so); one that cannot be a server's URL raises ServerUrlError."""

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
        server = server_url(base_url)
        if server.note:
            log.warning(server.note)
        self.base_url = server.base
        self._http = self._open(
            base_url=server.base, headers=headers(api_key), timeout=timeout, **httpx_options
        )
        self.retries = retries
        self.max_retry_wait = max_retry_wait

    def _open(self, **options: Any) -> Http:
        raise NotImplementedError

    def _exchange(self, call: Call[T], max_retry_wait: float | None = None) -> Exchange[T]:
        wait = self.max_retry_wait if max_retry_wait is None else max_retry_wait
        return Exchange(call, self.retries, wait)
