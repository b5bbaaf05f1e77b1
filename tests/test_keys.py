"""The API key store contract, run against every implementation (SQLite for one machine,
Redis for many API nodes): keys are shown once, stored only as hashes, checked in
constant time, revocable, and one deployment's keys open nothing in another."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fluxredux.access.keys import UNAUTHORIZED, KeyStore, digest, parse_key
from fluxredux.errors import Unauthorized
from tests.backends import Engine
from tests.helpers import run_threads

SEAM = "keys"


@pytest.fixture
def keys(engine: Engine) -> KeyStore:
    return engine.open()


def stored(engine: Engine) -> str:
    """Everything the engine has written for the key store, as text."""
    if engine.name == "sqlite":
        # The WAL file too: recent writes stay there until a checkpoint.
        files = sorted(engine.tmp_path.glob(f"{engine.database().name}*"))
        return "".join(path.read_bytes().decode("latin-1") for path in files)
    return redis_contents(engine.redis_client(), engine.prefix())


def redis_contents(client: Any, prefix: str) -> str:
    """Every key name and value under ``prefix``, read by type (DUMP may compress)."""
    parts: list[str] = []
    for name in client.scan_iter(match=f"{prefix}*"):
        parts.append(name)
        kind = client.type(name)
        if kind == "hash":
            parts += [f"{k}={v}" for k, v in client.hgetall(name).items()]
        elif kind == "zset":
            parts += [f"{m}={s!r}" for m, s in client.zrange(name, 0, -1, withscores=True)]
        elif kind == "set":
            parts += sorted(client.smembers(name))
        elif kind == "list":
            parts += client.lrange(name, 0, -1)
        else:
            parts.append(str(client.get(name)))
    return "\n".join(parts)


def refused(keys: KeyStore, presented: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        keys.verify(presented)
    assert caught.value.message == UNAUTHORIZED  # one message, whatever was wrong


def test_create_verify_list_revoke(keys: KeyStore) -> None:
    before = time.time()
    alice, alice_key = keys.create("alice")
    bob, bob_key = keys.create("bob")
    assert alice_key.startswith(f"fr_{alice.id}_") and alice.id != bob.id and alice_key != bob_key
    assert (alice.name, alice.revoked_at, alice.active) == ("alice", None, True)
    assert before - 5 <= alice.created_at <= bob.created_at <= time.time() + 5
    assert keys.verify(alice_key) == alice and keys.verify(bob_key) == bob
    assert keys.list() == [alice, bob]  # in created order

    assert keys.revoke(alice.id) is True
    assert keys.revoke(alice.id) is False  # once
    assert keys.revoke("000000000000") is False
    refused(keys, alice_key)
    assert keys.verify(bob_key) == bob  # the other key is untouched
    listed = keys.list()
    assert [k.id for k in listed] == [alice.id, bob.id]  # revoked keys stay listed...
    assert listed[0].revoked_at is not None and listed[0].revoked_at >= alice.created_at
    assert not listed[0].active and listed[1] == bob  # ...as revoked


def test_a_wrong_secret_is_refused(keys: KeyStore) -> None:
    key, secret = keys.create("alice")
    parsed = parse_key(secret)
    assert parsed is not None and parsed[0] == key.id
    refused(keys, f"fr_{key.id}_{'A' * len(parsed[1])}")
    refused(keys, secret[:-1])
    refused(keys, secret + "x")
    refused(keys, f"fr_{key.id}_")


@pytest.mark.parametrize(
    "presented",
    [
        None,
        "",
        "fr_",
        "fr__",
        "fr_abc",
        "fr__secret",
        "FR_abc_def",
        "Bearer fr_abc_def",
        "abc_def_ghi",
        "fr_created_x",  # ids that a store must not mistake for one of its own names
        "fr_:_x",
        "fr_../../_x",
        f"fr_{'a' * 10_000}_{'b' * 10_000}",
    ],
)
def test_malformed_or_unknown_keys_are_refused(keys: KeyStore, presented: str | None) -> None:
    keys.create("alice")
    refused(keys, presented)


def test_a_key_of_another_deployment_opens_nothing_here(engine: Engine, keys: KeyStore) -> None:
    key, secret = keys.create("alice")
    other = engine.open("other")  # its own file, or its own prefix
    refused(other, secret)
    assert other.list() == [] and other.revoke(key.id) is False
    assert keys.verify(secret) == key  # and the other one revoked nothing here


def test_only_hashes_are_stored(engine: Engine, keys: KeyStore) -> None:
    key, secret = keys.create("alice")
    parsed = parse_key(secret)
    assert parsed is not None
    contents = stored(engine)
    assert digest(parsed[1]) in contents  # this reads what the store wrote...
    assert parsed[1] not in contents and secret not in contents  # ...and no secret is in it
    keys.revoke(key.id)
    assert parsed[1] not in stored(engine)


def test_a_key_is_revoked_once_under_concurrent_revokes(keys: KeyStore) -> None:
    key, _secret = keys.create("alice")
    results: list[bool] = []
    run_threads([lambda: results.append(keys.revoke(key.id))] * 8)
    assert sorted(results) == [False] * 7 + [True]
