"""One domain error hierarchy.

Each error carries a stable machine-readable ``code`` and a message a user can act
on. No HTTP status codes here: the API maps error classes to statuses in one place.
"""

from __future__ import annotations

from typing import Any


class FluxReduxError(Exception):
    """Base of every error fluxredux raises on purpose."""

    code = "error"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code, **self.detail}


class ClientError(FluxReduxError):
    """The caller's request is wrong; retrying it unchanged will fail again."""

    code = "invalid_request"


class InvalidInput(ClientError):
    """One or more input fields are invalid."""

    code = "invalid_input"


class InvalidLora(InvalidInput):
    """An adapter that cannot be used, named by its field (``input.loras.N.name``). A 400
    at create time, or a failed prediction's error where only the worker can tell (a LoRA
    whose shapes are another model's). ``code`` names the specific reason."""

    def __init__(self, code: str, message: str, *, index: int) -> None:
        field = f"input.loras.{index}.name"
        super().__init__(
            f"{field}: {message}",
            fields=[{"field": field, "message": message, "type": code}],
            field=field,
        )
        self.code = code


class ImageError(ClientError):
    """The reference image cannot be used. ``code`` names the specific reason."""

    code = "invalid_image"

    def __init__(self, code: str, message: str, **detail: Any) -> None:
        super().__init__(message, **detail)
        self.code = code


class ImageFileNotFound(ImageError):
    """A reference names a file this caller cannot use: an upload id that is unknown,
    expired or another key's (answered alike, so ids tell nothing), or a link to a file no
    longer stored. A 404, naming the field."""


class WeightsNotFound(FluxReduxError):
    """Model weights are not on this machine; the message says how to get them."""

    code = "weights_not_found"


class TextEncodersMissing(WeightsNotFound):
    """A prompt needs FLUX.1 [schnell]'s text encoders, and they are not on this machine."""

    code = "text_encoders_missing"


class ModelUnavailable(FluxReduxError):
    """The requested model cannot run here (e.g. the real model without a GPU)."""

    code = "model_unavailable"


class PredictionCancelled(FluxReduxError):
    """The prediction was cancelled while it ran."""

    code = "cancelled"


class AllOutputsUnsafe(FluxReduxError):
    """Every generated image was flagged by the safety checker."""

    code = "nsfw_content"


class UnknownModel(ClientError):
    """The request names a model this server does not serve."""

    code = "unknown_model"


class IdempotencyConflict(ClientError):
    """An ``Idempotency-Key`` already used with a different request (body or route)."""

    code = "idempotency_key_reused"


class TooManyShares(ClientError):
    """The prediction has as many live share links as it may (``limit``); revoke one first."""

    code = "too_many_shares"

    def __init__(self, limit: int, **detail: Any) -> None:
        super().__init__(
            f"this prediction has {limit} live share links, the most it may have; revoke one to make another",
            limit=limit,
            **detail,
        )
        self.limit = limit


class Unauthorized(FluxReduxError):
    """Missing, unknown or revoked API key."""

    code = "unauthorized"


class NotFound(FluxReduxError):
    """No such prediction or file (or not the caller's)."""

    code = "not_found"


class RateLimited(FluxReduxError):
    """Over a per-key limit; ``retry_after`` seconds until a retry can succeed."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float, **detail: Any) -> None:
        super().__init__(message, retry_after=max(1, int(retry_after + 0.999)), **detail)
        self.retry_after: int = self.detail["retry_after"]


class TooManyStreams(RateLimited):
    """As many event streams open as the key (or the node) may hold; close one first."""

    code = "too_many_streams"


class QueueFull(FluxReduxError):
    """The server's queue is at its cap; nothing was queued."""

    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 5, **detail: Any) -> None:
        super().__init__(message, retry_after=int(retry_after), **detail)
        self.retry_after: int = self.detail["retry_after"]


class Unavailable(FluxReduxError):
    """The server cannot take this request right now; retrying after ``retry_after`` s may work."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: float = 2, **detail: Any) -> None:
        super().__init__(message, retry_after=max(1, int(retry_after + 0.999)), **detail)
        self.retry_after: int = self.detail["retry_after"]


class StoreUnavailable(Unavailable):
    """The job store (or file storage) cannot be read or written: locked, full, read-only."""

    code = "store_unavailable"


class WouldWait(StoreUnavailable):
    """A read asked to answer at once would have had to wait (a lock held elsewhere, a
    network store): the caller reads in a thread instead. Should one escape, it is a 503."""

    code = "store_unavailable"


class NoWorker(Unavailable):
    """No worker is alive or starting, so an accepted prediction would never run."""

    code = "no_worker"


class StorageError(Unavailable):
    """Writing or reading a stored file failed (disk full, read-only, file-size limit).

    In a request: 503, retry later. In a worker: that prediction fails with this code."""

    code = "storage_error"


class PayloadTooLarge(ClientError):
    """The request body is over the server's cap."""

    code = "payload_too_large"


class FetchRefused(ImageError):
    """A redux_image URL was refused or could not be fetched; ``code`` says why."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, shortened: for one-line reports of what a library raised."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
