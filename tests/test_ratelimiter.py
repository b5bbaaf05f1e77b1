"""The RateLimiter contract, run against every implementation (one node's memory today;
a backend shared by several nodes adds one line to LIMITERS)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fluxredux.backends.redis.limits import RedisRateLimiter
from fluxredux.backends.sqlite.limits import InProcessRateLimiter
from fluxredux.errors import RateLimited
from fluxredux.jobs.limits import RateLimiter


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# (limit, window seconds, clock) -> a limiter with no hits recorded yet.
LimiterFactory = Callable[[int, float, FakeClock], RateLimiter]


def _redis_limiters(request: pytest.FixtureRequest) -> LimiterFactory:
    # Asked for only here, so that the other backends' tests never start redis-server.
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    opened: list[RedisRateLimiter] = []

    def close_all() -> None:
        for limiter in opened:
            limiter.close()

    request.addfinalizer(close_all)

    def make(limit: int, window: float, clock: FakeClock) -> RateLimiter:
        opened.append(RedisRateLimiter(url, limit, window, prefix=prefix, clock=clock))
        return opened[-1]

    return make


# Each implementation: the test's request -> its factory.
LIMITERS: dict[str, Callable[[pytest.FixtureRequest], LimiterFactory]] = {
    "memory": lambda _: lambda limit, window, clock: InProcessRateLimiter(limit, window, clock=clock),
    "redis": _redis_limiters,
}


@pytest.fixture(params=sorted(LIMITERS))
def make(request: pytest.FixtureRequest) -> LimiterFactory:
    return LIMITERS[request.param](request)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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


def test_exactly_the_limit_gets_through_eight_threads_on_one_key(
    make: LimiterFactory, clock: FakeClock
) -> None:
    limiter = make(50, 60, clock)
    start = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        start.wait()
        mine = [allowed(limiter) for _ in range(40)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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


def test_redis_nodes_with_their_own_clients_share_the_limit_exactly(
    redis_url: str, redis_prefix: str
) -> None:
    """Eight API nodes (eight clients, Redis's own clock): 50 hits through, not one more."""
    nodes = [RedisRateLimiter(redis_url, 50, 60, prefix=redis_prefix) for _ in range(8)]
    start = threading.Barrier(len(nodes))
    results: list[bool] = []
    lock = threading.Lock()

    def hammer(node: RateLimiter) -> None:
        start.wait()
        mine = [allowed(node) for _ in range(40)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=hammer, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (results.count(True), results.count(False)) == (50, 270)
    assert 30 <= refusal(nodes[0]).retry_after <= 60  # the oldest hit expires within the window (Redis clock)
    for node in nodes:
        node.close()


def test_redis_limiter_unreachable_is_store_unavailable_quickly() -> None:
    from tests.services import assert_each_unavailable_quickly, unreachable_redis_url

    limiter = RedisRateLimiter(unreachable_redis_url(), 5, 60)
    assert_each_unavailable_quickly([lambda: limiter.hit("k", "hits")])
    limiter.close()
