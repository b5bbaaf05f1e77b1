"""API keys: created once, shown once, stored only as hashes, checked in constant time.

A key looks like ``fr_<key id>_<secret>``. The id finds the record; the SHA-256 of the
secret is compared with ``hmac.compare_digest``. Keys are 256-bit random strings, so a
fast hash is enough (slow password hashes are for guessable secrets).

``KeyStore`` is a small protocol: SQLite in ``backends/sqlite/keys.py``
(one machine), Redis in ``backends/redis/keys.py`` (many API nodes), one contract suite
(tests/test_keys.py). What makes a key a key (its format, its digest, the constant-time check
and the one message for every failure) is decided here, once, for both.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from fluxredux.errors import Unauthorized

# One message for a missing, malformed, unknown, wrong or revoked key: which of these it
# was would tell a guesser what to try next.
UNAUTHORIZED = "missing or invalid API key: send it as X-API-Key (or Authorization: Bearer)"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class NewKey(NamedTuple):
    """A freshly made key: ``id`` and ``digest`` are stored, ``key`` is shown once."""

    id: str
    digest: str  # SHA-256 of the secret, hex
    key: str  # fr_<id>_<secret>, all the client ever sends


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, digest(secret), f"fr_{key_id}_{secret}")


def parse_key(presented: str | None) -> tuple[str, str] | None:
    """(key id, secret) of something shaped like a key, else None. The id never holds an
    underscore; the secret may (URL-safe base64)."""
    if not presented or not presented.startswith("fr_"):
        return None
    key_id, _, secret = presented[3:].partition("_")
    return (key_id, secret) if key_id and secret else None


# The record of a key id and its stored digest, or None: what each store looks up.
Lookup = Callable[[str], tuple[ApiKey, str] | None]


def check_key(presented: str | None, lookup: Lookup) -> ApiKey:
    """The active key ``presented`` is, or Unauthorized. An unknown id costs the same
    digest and comparison as a known one, so timing does not tell which ids exist."""
    parsed = parse_key(presented)
    if parsed is not None:
        key_id, secret = parsed
        found = lookup(key_id)
        expected = found[1] if found else digest("no such key")
        if hmac.compare_digest(digest(secret), expected) and found and found[0].active:
            return found[0]
    raise Unauthorized(UNAUTHORIZED)


class KeyStore(Protocol):
    def create(self, name: str) -> tuple[ApiKey, str]:
        """A new key; the full key string is returned here and never again."""

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones too, in the order they were created."""

    def revoke(self, key_id: str) -> bool:
        """Revoke an active key for good; False when there is no such active key."""

    def verify(self, presented: str | None) -> ApiKey:
        """The key's record, or Unauthorized (one message for every failure)."""

    def close(self) -> None: ...
