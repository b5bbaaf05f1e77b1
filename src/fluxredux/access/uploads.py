"""Uploaded reference images: records of what ``POST /v1/files`` stored, with their own
retention.

An upload may be used by any number of predictions, so it is not deleted with any of
them (each URL or data: URI input is a copy of its own, deleted with its prediction).
An upload is kept until the retention period has passed since it was last used: every
create that names it bumps ``last_used_at``. Only recorded uploads are found by id, so an
output's or another prediction's input file can never be used as an upload.

Expiry is two-step so that a blob is never deleted under a create that has just used it,
and a failed blob deletion is retried: ``expire`` marks the records (a marked upload is
no longer found), the caller deletes their blobs, then ``forget`` drops the records.

An owner deletes an upload the same two-step way: ``withdraw`` marks that one upload
expired at once, the caller deletes its blob, then ``forget``s it (if the deletion fails,
the next retention round finds it marked and finishes the job).

``UploadStore`` is a small protocol (add, get, use, uploaded, expire, withdraw, forget): SQLite in
``backends/sqlite/uploads.py`` (one machine), Redis in ``backends/redis/uploads.py`` (many API nodes), one
contract suite (tests/test_uploads.py). Times are the caller's ``now`` when given, else
the store's clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Upload:
    id: str  # what clients pass as redux_image
    key: str  # the blob's key (its id plus the format's extension)
    owner: str  # the API key id that uploaded it
    created_at: float
    last_used_at: float  # upload time, or the last create that used it


def upload_id_of(key: str) -> str:
    """An upload's id: its blob key's random part (the key without its extension)."""
    return key.split(".", 1)[0]


def already_recorded(key: str) -> ValueError:
    """What ``add`` raises for a blob key (or id) that is an upload already: a caller's bug
    (every stored blob gets a fresh random name), refused rather than overwriting the
    first record's owner and times."""
    return ValueError(f"{key!r} is recorded as an upload already")


class UploadStore(Protocol):
    def add(self, key: str, owner: str, now: float | None = None) -> Upload:
        """Record a stored blob as an upload; its id is the key's random part. ValueError
        when that key or id is an upload already."""

    def get(self, upload_id: str) -> Upload | None:
        """The upload; None if unknown or expired."""

    def use(self, upload_id: str, now: float | None = None) -> Upload | None:
        """The upload, its ``last_used_at`` bumped to ``now`` (never moved back), in one
        atomic step with the check that it has not expired; None if unknown or expired."""

    def uploaded(self, keys: Iterable[str]) -> set[str]:
        """Which of these blob keys belong to uploads (expired or not)."""

    def expire(self, unused_since: float, limit: int = 10_000) -> list[Upload]:
        """Mark uploads last used before ``unused_since`` as expired (no longer found),
        and return the marked ones, oldest use first: these plus any an earlier round
        marked but did not ``forget`` (its blob deletion failed)."""

    def withdraw(self, upload_id: str) -> Upload | None:
        """Mark this one upload expired now (its owner deletes it): no longer found, its
        blob to be deleted, then ``forget``. None when unknown or expired already."""

    def forget(self, upload_ids: Iterable[str]) -> int:
        """Drop the records of expired uploads whose blobs are gone; how many went (one
        that is not expired stays)."""

    def close(self) -> None: ...
