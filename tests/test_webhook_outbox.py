"""The webhook outbox contract, run against every engine (tests/backends.py): idempotent
enqueue, atomic leased claims (an expired one is claimable again), outcomes fenced by the
claim.

Each handle the engine opens is on one shared outbox: for SQLite a new connection to the
same file (as separate processes have), for Redis a client of its own (as another node
has), for memory the one object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fluxredux.jobs.outbox import WebhookOutbox
from tests.backends import Engine
from tests.helpers import FakeClock, run_threads

SEAM = "outbox"
Opener = Callable[[], WebhookOutbox]
LEASE = 30.0
URL = "https://hooks.example/x"


@pytest.fixture
def open_outbox(engine: Engine) -> Opener:
    return engine.open


@pytest.fixture
def outbox(open_outbox: Opener) -> WebhookOutbox:
    return open_outbox()


def test_enqueue_is_idempotent_per_prediction(outbox: WebhookOutbox, clock: FakeClock) -> None:
    first = outbox.enqueue("p1", URL)
    assert (first.state, first.attempts, first.next_at, first.url) == ("pending", 0, clock.now, URL)
    assert (first.claim_owner, first.claim_expires_at, first.finished_at) == (None, None, None)
    clock.now += 5
    again = outbox.enqueue("p1", "https://elsewhere.example/")
    assert again == first == outbox.get("p1")
    assert outbox.get("nobody") is None


def test_claims_take_due_deliveries_earliest_first_and_count_the_try(
    outbox: WebhookOutbox, clock: FakeClock
) -> None:
    for name in ("b", "a", "c"):
        outbox.enqueue(name, URL)
        clock.now += 1
    assert outbox.claim_due("w1", LEASE, limit=0) == []
    claimed = outbox.claim_due("w1", LEASE, limit=2)
    assert [d.prediction_id for d in claimed] == ["b", "a"]
    for d in claimed:
        assert (d.attempts, d.claim_owner, d.claim_expires_at, d.next_at) == (
            1,
            "w1",
            clock.now + LEASE,
            clock.now + LEASE,
        )
        assert outbox.get(d.prediction_id) == d
    # claimed ones are not due again while their lease lasts
    assert [d.prediction_id for d in outbox.claim_due("w2", LEASE, limit=10)] == ["c"]
    assert outbox.claim_due("w2", LEASE, limit=10) == []


def test_a_delivery_not_yet_due_is_not_claimed(outbox: WebhookOutbox, clock: FakeClock) -> None:
    outbox.enqueue("p1", URL)
    [claimed] = outbox.claim_due("w1", LEASE, 1)
    retried = outbox.retry(claimed, delay=4.0)
    assert retried is not None
    assert (retried.state, retried.attempts, retried.next_at) == ("pending", 1, clock.now + 4)
    assert (retried.claim_owner, retried.claim_expires_at) == (None, None)
    clock.now += 3.9
    assert outbox.claim_due("w1", LEASE, 1) == []
    clock.now += 0.1
    [again] = outbox.claim_due("w2", LEASE, 1)
    assert (again.attempts, again.claim_owner) == (2, "w2")


def test_an_expired_claim_is_claimable_again_and_fences_out_its_first_owner(
    outbox: WebhookOutbox, clock: FakeClock
) -> None:
    outbox.enqueue("p1", URL)
    [stale] = outbox.claim_due("w1", LEASE, 1)
    clock.now += LEASE - 0.1
    assert outbox.claim_due("w2", LEASE, 1) == []  # still held
    clock.now += 0.1
    [fresh] = outbox.claim_due("w2", LEASE, 1)
    assert (fresh.attempts, fresh.claim_owner) == (2, "w2")
    assert fresh.claim_token != stale.claim_token
    # the first claimer finishes late: none of its outcomes lands
    assert outbox.succeeded(stale) is None
    assert outbox.failed(stale) is None
    assert outbox.retry(stale, 1.0) is None
    assert outbox.get("p1") == fresh
    done = outbox.succeeded(fresh)
    assert done is not None and (done.state, done.finished_at, done.attempts) == ("delivered", clock.now, 2)


def test_the_same_owner_claiming_again_is_fenced_by_the_token(
    outbox: WebhookOutbox, clock: FakeClock
) -> None:
    """One process whose own slow try ran past its lease and which claimed it again."""
    outbox.enqueue("p1", URL)
    [first] = outbox.claim_due("w1", LEASE, 1)
    clock.now += LEASE
    [second] = outbox.claim_due("w1", LEASE, 1)
    assert outbox.failed(first) is None
    assert outbox.get("p1") == second


def test_an_expired_claim_nobody_took_over_still_records(outbox: WebhookOutbox, clock: FakeClock) -> None:
    outbox.enqueue("p1", URL)
    [claimed] = outbox.claim_due("w1", LEASE, 1)
    clock.now += LEASE * 2
    done = outbox.failed(claimed)
    assert done is not None and done.state == "failed"


def test_final_deliveries_are_never_claimed_nor_enqueued_again(
    outbox: WebhookOutbox, clock: FakeClock
) -> None:
    outbox.enqueue("ok", URL)
    outbox.enqueue("ko", URL)
    ko, ok = outbox.claim_due("w1", LEASE, 2)  # same due time: by id
    delivered, failed = outbox.succeeded(ok), outbox.failed(ko)
    assert delivered is not None and failed is not None
    assert (delivered.state, failed.state) == ("delivered", "failed")
    assert outbox.succeeded(delivered) is None  # nothing held any more
    clock.now += LEASE * 10
    assert outbox.claim_due("w1", LEASE, 10) == []
    assert outbox.enqueue("ok", URL) == delivered
    assert outbox.next_due() is None


def test_next_due_is_the_earliest_time_to_look_again(outbox: WebhookOutbox, clock: FakeClock) -> None:
    assert outbox.next_due() is None
    start = clock.now
    outbox.enqueue("p1", URL)
    clock.now += 2
    outbox.enqueue("p2", URL)
    assert outbox.next_due() == start
    [claimed] = outbox.claim_due("w1", LEASE, 1)  # p1, until its lease ends
    assert outbox.next_due() == clock.now  # p2, due since it was enqueued
    [p2] = outbox.claim_due("w1", LEASE, 1)
    assert outbox.next_due() == clock.now + LEASE
    assert outbox.retry(p2, 3.0) is not None
    assert outbox.next_due() == clock.now + 3.0
    assert claimed.prediction_id == "p1"


def test_forget_deletes_only_old_final_records(outbox: WebhookOutbox, clock: FakeClock) -> None:
    for name in ("old", "recent", "pending"):
        outbox.enqueue(name, URL)
    [old] = outbox.claim_due("w1", LEASE, 1)
    outbox.succeeded(old)
    clock.now += 100
    [recent] = outbox.claim_due("w1", LEASE, 1)
    outbox.failed(recent)
    assert outbox.forget(finished_before=clock.now - 50) == 1
    assert outbox.get("old") is None
    assert outbox.get("recent") is not None and outbox.get("pending") is not None


def test_concurrent_claimers_never_get_the_same_delivery(open_outbox: Opener, clock: FakeClock) -> None:
    """Claimers on their own handles (their own connections, as separate processes), all
    at once: every delivery is claimed, and by one of them only."""
    setup = open_outbox()
    names = [f"p{i:03d}" for i in range(120)]
    for name in names:
        setup.enqueue(name, URL)
    handles = [open_outbox() for _ in range(4)]
    claims: list[list[str]] = [[] for _ in handles]
    start = threading.Barrier(len(handles))

    def claim_all(index: int) -> None:
        start.wait()
        while batch := handles[index].claim_due(f"w{index}", LEASE, limit=7):
            claims[index].extend(d.prediction_id for d in batch)

    run_threads([lambda i=i: claim_all(i) for i in range(len(handles))], timeout=30)
    every = [name for mine in claims for name in mine]
    assert sorted(every) == names  # each exactly once
    for index, mine in enumerate(claims):
        for name in mine:
            assert setup.get(name).claim_owner == f"w{index}"  # type: ignore[union-attr]


@pytest.mark.engines("redis")
def test_redis_outbox_on_redis_time(engine: Engine) -> None:
    """Without an injected clock every stamp is Redis TIME, read inside the scripts."""
    outbox = engine.open(clock=None)
    before = outbox.now()
    enqueued = outbox.enqueue("p1", URL)
    [claimed] = outbox.claim_due("w1", LEASE, 1)
    after = outbox.now()
    assert before <= enqueued.created_at == enqueued.next_at <= claimed.next_at - LEASE <= after
    assert claimed.claim_expires_at == claimed.next_at == outbox.next_due()
    done = outbox.succeeded(claimed)
    assert done is not None and done.finished_at is not None and done.finished_at >= claimed.next_at - LEASE
    assert outbox.next_due() is None
    assert outbox.forget(finished_before=outbox.now() + 1) == 1 and outbox.get("p1") is None
