"""The RateLimiter contract, run against every engine (tests/backends.py): the one-machine
limiter counted in its one HTTP process, and Redis, shared by every API node."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fluxredux.backends.redis.limits import RedisRateLimiter
from fluxredux.errors import RateLimited
from fluxredux.jobs.limits import RateLimiter
from tests.backends import Engine
from tests.helpers import FakeClock, run_threads

SEAM = "limiter"
# (limit, window seconds, clock) -> a limiter with no hits recorded yet.
LimiterFactory = Callable[[int, float, FakeClock], RateLimiter]


@pytest.fixture
def make(engine: Engine) -> LimiterFactory:
    return lambda limit, window, clock: engine.open(clock=clock, limit=limit, window=window)


def allowed(limiter: RateLimiter, key: str = "k") -> bool:
    try:
        limiter.hit(key, "hits")
    except RateLimited:
        return False
    return True


def refusal(limiter: RateLimiter, key: str = "k") -> RateLimited:
    with pytest.raises(RateLimited) as info:
        limiter.hit(key, "hits")
    return info.value


def hammer_at_once(limiters: list[RateLimiter], hits: int = 40) -> list[bool]:
    """Each limiter (one per thread) hit ``hits`` times on one key, all threads at once."""
    start = threading.Barrier(len(limiters))
    results: list[bool] = []
    lock = threading.Lock()

    def hammer(limiter: RateLimiter) -> None:
        start.wait()
        mine = [allowed(limiter) for _ in range(hits)]
        with lock:
            results.extend(mine)

    run_threads([lambda limiter=limiter: hammer(limiter) for limiter in limiters])
    return results


def test_exactly_the_limit_gets_through_eight_threads_on_one_key(
    make: LimiterFactory, clock: FakeClock
) -> None:
    results = hammer_at_once([make(50, 60, clock)] * 8)
    assert (results.count(True), results.count(False)) == (50, 270)


def test_the_limit_and_window_are_reported(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = make(2, 30, clock)
    assert (limiter.limit, limiter.window) == (2, 30)
    assert allowed(limiter) and allowed(limiter)
    error = refusal(limiter)
    assert (error.code, error.detail["limit"], error.detail["window_seconds"]) == ("rate_limited", 2, 30)
    assert "at most 2 hits per 30 s" in error.message


def test_refused_hits_are_not_counted(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = make(2, 10, clock)
    assert allowed(limiter)
    clock.now += 1
    assert allowed(limiter)
    for _ in range(9):  # a client hammering while refused, up to just before the first expires
        clock.now += 0.999
        assert not allowed(limiter)
    clock.now = 1_000_010.0  # the first hit expires: one place, whatever was refused meanwhile
    assert allowed(limiter)
    assert not allowed(limiter)
    clock.now += 1  # the second expires
    assert allowed(limiter)


def test_the_window_slides(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = make(3, 60, clock)
    for _ in range(3):  # at 0, 10 and 20 s
        assert allowed(limiter)
        clock.now += 10
    assert not allowed(limiter)  # at 30 s all three still count
    clock.now += 29.9
    assert not allowed(limiter)  # at 59.9 s too
    clock.now = 1_000_060.0
    assert allowed(limiter)  # at 60 s the first no longer counts (its window is [0, 60))
    assert not allowed(limiter)
    clock.now += 10
    assert allowed(limiter)  # at 70 s the second one's place
    clock.now += 1000
    assert all(allowed(limiter) for _ in range(3)) and not allowed(limiter)  # all expired: a fresh window


def test_keys_are_independent(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = make(2, 60, clock)
    assert allowed(limiter, "a") and allowed(limiter, "a") and not allowed(limiter, "a")
    assert allowed(limiter, "b") and allowed(limiter, "b") and not allowed(limiter, "b")
    assert not allowed(limiter, "a")


def test_retry_after_is_when_the_oldest_hit_expires(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = make(2, 60, clock)
    assert allowed(limiter)
    clock.now += 15
    assert allowed(limiter)
    clock.now += 5  # hits at 0 and 15 s; now 20 s: the first expires at 60 s
    assert refusal(limiter).retry_after == 40
    clock.now += 39.5  # whole seconds, rounded up: waiting what it says is always enough
    assert refusal(limiter).retry_after == 1
    clock.now += 0.5
    assert allowed(limiter)  # at 60 s, as promised
    assert refusal(limiter).retry_after == 15  # next: the hit at 15 s, expiring at 75 s


@pytest.mark.engines("redis")
def test_redis_nodes_with_their_own_clients_share_the_limit_exactly(engine: Engine) -> None:
    """Eight API nodes (eight clients, Redis's own clock): 50 hits through, not one more."""
    nodes: list[RedisRateLimiter] = [engine.open(clock=None, limit=50, window=60) for _ in range(8)]
    results = hammer_at_once(list(nodes))
    assert (results.count(True), results.count(False)) == (50, 270)
    assert 30 <= refusal(nodes[0]).retry_after <= 60  # the oldest hit expires within the window (Redis clock)
