"""Per-key request limits: the RateLimiter seam and its one-node implementation.

A limit is "at most ``limit`` hits per ``window`` seconds per key", a sliding window.
Deciding and recording are one operation (``hit``) so that a backend shared by several
API nodes can make it atomic: with Redis, one Lua script over a sorted set per key
(drop members scored at or before ``now - window``; if fewer than ``limit`` remain, add
``now``, else answer the oldest score). Two nodes that check, then record, would both let
the last allowed hit through.
"""

from __future__ import annotations

from typing import Protocol

from fluxredux.errors import RateLimited


class RateLimiter(Protocol):
    """At most ``limit`` hits per ``window`` seconds per key.

    A hit at time ``t`` counts against its key until ``t + window`` (exclusive); a refused
    hit is not counted, so a client that keeps retrying is let in as soon as the oldest
    counted hit expires."""

    @property
    def limit(self) -> int: ...

    @property
    def window(self) -> float: ...

    def hit(self, key: str, what: str) -> None:
        """Count one hit on ``key`` if the key is under its limit, else raise RateLimited.

        Atomic: concurrent hits on one key (from any thread, or any node sharing the
        backend) never let more than ``limit`` through per window. ``what`` names the
        limited thing in the error message ("reads"). The error's ``retry_after`` is the
        time until the key's oldest counted hit expires: a retry then succeeds unless
        another hit took the freed place first."""
        ...


def rate_limited(limit: int, window: float, retry_after: float, what: str) -> RateLimited:
    """The refusal every implementation raises, so messages and details match."""
    return RateLimited(
        f"rate limit: at most {limit} {what} per {window:g} s per API key; "
        f"retry in {max(1, round(retry_after))} s",
        retry_after=retry_after,
        limit=limit,
        window_seconds=window,
    )
