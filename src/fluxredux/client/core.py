"""What the sync and async clients share, none of it doing I/O.

Each public method of the two clients is one thin shell: it asks this module for the
request to send (a ``Call``: method, URL, httpx options, how its answer is read), sends
it with its own httpx client, feeds each try's outcome to an ``Exchange`` (the retry
policy: send again, after how long, or stop), sleeps its own way, and returns what the
call reads from the answer. So URLs, bodies, headers, retries, errors and parsing are
written once, here, and only the sending and the sleeping are written twice.

The inputs are not checked against fluxredux.schema.PredictionInput here: the server
checks them, and answers a bad one with a 400 that becomes an ApiError (the CLI's
``run`` checks its flags before it calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeGuard, TypeVar

import httpx
from pydantic import BaseModel

from fluxredux.api.eachlabs.shapes import Prediction, PredictionList, UploadedFile
from fluxredux.errors import FluxReduxError
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

IDEMPOTENCY_HEADER = "Idempotency-Key"


class ApiError(FluxReduxError):
    """The server answered with an error: ``status`` (HTTP), ``code`` and its message."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(
            str(body.get("error", f"HTTP {status}")), **{k: v for k, v in body.items() if k != "error"}
        )
        self.status = status
        self.code = str(body.get("code", "http_error"))


class CreateOptions(TypedDict, total=False):
    """What ``create`` takes besides the inputs (one definition for both clients)."""

    webhook_url: str | None
    webhook_secret: str | None
    idempotency_key: str | None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request plan: what to send, and how its successful answer is read."""

    method: str
    url: str
    read: Callable[[httpx.Response], T]
    options: Mapping[str, Any] = field(default_factory=dict)  # for httpx's request(): json, params...
    # Whether a try whose answer was lost (the connection dropped after the request went
    # out) may be sent again: only when a resend cannot do the work twice.
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
        key = self.options.get("idempotency_key")
        if not key:
            return Call("POST", "/v1/prediction/", _prediction_id, {"json": body})
        # With a key, the server answers a repeat with the first create's prediction, so a
        # create whose answer was lost may be asked for again.
        options = {"json": body, "headers": {IDEMPOTENCY_HEADER: key}}
        return Call("POST", "/v1/prediction/", _prediction_id, options, resend_if_lost=True)


def create_plan(inputs: Mapping[str, Any], **options: Unpack[CreateOptions]) -> CreatePlan:
    # The clients take these as **options: a misspelt one must still fail as a keyword
    # argument does, and before anything is uploaded.
    unknown = sorted(options.keys() - CreateOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"create() got an unexpected keyword argument {unknown[0]!r}")
    return CreatePlan(inputs, options)


def get_call(prediction_id: str, wait: float) -> Call[Prediction]:
    # The server holds a ?wait= request up to that long: the timeout leaves room for it.
    params = {"wait": wait} if wait else None
    options = {"params": params, "timeout": wait + 30}
    return Call("GET", f"/v1/prediction/{prediction_id}", _as(Prediction), options)


def cancel_call(prediction_id: str) -> Call[Prediction]:
    return Call("POST", f"/v1/prediction/{prediction_id}/cancel", _as(Prediction))


def list_call(limit: int, cursor: str | None) -> Call[PredictionList]:
    params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    return Call("GET", "/v1/prediction/", _as(PredictionList), {"params": params})


def download_call(url: str) -> Call[bytes]:
    return Call("GET", url, _content)


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

    ``retries`` bounds the resends, ``max_wait`` the seconds waited for them in all."""

    def __init__(self, call: Call[T], retries: int, max_wait: float) -> None:
        self.call = call
        self.retries = retries
        self.wait_left = max_wait
        self._answer: httpx.Response | None = None

    def after(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """The delay before the next try, or None: the answer is in (else this raises:
        an ApiError for an error answer, the transport error for a loss not resent)."""
        if isinstance(outcome, httpx.TransportError):
            if self.call.resend_if_lost and self.retries > 0:
                self.retries -= 1
                return 0.0  # at once: the server did not ask for a pause
            raise outcome
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

    def over(self, prediction: Prediction) -> bool:
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        return prediction.status in TERMINAL or timed_out


def headers(api_key: str) -> dict[str, str]:
    return {"X-API-Key": api_key, "User-Agent": "fluxredux-client"}


class ClientBase(Generic[Http]):
    """What both clients take and keep (the options are told in FluxRedux's docstring);
    each opens its own kind of httpx client (``_open``)."""

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
        self._http = self._open(
            base_url=base_url.rstrip("/"), headers=headers(api_key), timeout=timeout, **httpx_options
        )
        self.retries = retries
        self.max_retry_wait = max_retry_wait

    def _open(self, **options: Any) -> Http:
        raise NotImplementedError

    def _exchange(self, call: Call[T]) -> Exchange[T]:
        return Exchange(call, self.retries, self.max_retry_wait)
