"""A cancel must win: what waits on a wake-up with a timeout stops when it is cancelled,
even when the cancel lands in the very loop turn its wake-up does.

On Python 3.11 ``asyncio.wait_for`` returns the awaited result instead of raising when a
cancellation arrives just as the awaited thing completes (CPython gh-86296), so a loop
around it goes on as if nothing happened: ``WebhookSender.aclose()`` then never returned.
These tests make that race on purpose, many times.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fluxredux.api.prediction_actions import wait_until_done
from fluxredux.api.services import build_services
from fluxredux.backends.memory.jobs import MemoryJobStore
from fluxredux.backends.memory.outbox import MemoryWebhookOutbox
from fluxredux.config import Settings
from fluxredux.jobs.events import JobEvent
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.net import FetchPolicy, SafeFetcher
from fluxredux.webhooks.sender import WebhookPolicy, WebhookSender
from tests.harness import ThreadWorkers

ROUNDS = 200


async def _until(condition: object, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0)
    assert condition(), what  # type: ignore[operator]


def _waiting_for_a_wake_up(task: asyncio.Task[object]) -> bool:
    """The task is suspended in its wait for a wake-up (``Event.wait``, or ``wait_for``
    around it), not in a read of the store."""
    names = []
    awaited: Any = task.get_coro()
    while awaited is not None and hasattr(awaited, "cr_code"):  # down the chain of awaits
        names.append(awaited.cr_code.co_name)
        awaited = awaited.cr_await
    return bool(names) and names[-1] in ("wait", "wait_for")


def test_the_webhook_sweeper_stops_when_woken_and_closed_in_one_turn() -> None:
    async def one_round() -> None:
        sender = WebhookSender(
            MemoryJobStore(),
            MemoryWebhookOutbox(),
            WebhookPolicy(poll_seconds=30.0),  # a swallowed cancel would wait out the poll
            SafeFetcher(FetchPolicy(max_bytes=1024, timeout=1.0, allow_private=True)),
            lambda job: {},
        )
        sender.start()
        sweeper = sender._sweeper
        assert sweeper is not None
        # Let the sweeper reach its wait for a wake-up (two sweeps: start, then idle).
        for _ in range(20):
            await asyncio.sleep(0)
        sender.wake()  # the wake-up and the cancel in the same loop turn
        async with asyncio.timeout(5):
            await sender.aclose()
        assert sweeper.done()

    async def rounds() -> None:
        for _ in range(ROUNDS):
            await one_round()

    asyncio.run(rounds())


def test_a_long_poll_ends_when_cancelled_as_its_job_changes(tmp_path: Path) -> None:
    services = build_services(Settings(data_dir=tmp_path), lambda *_: ThreadWorkers())
    job = Job(id=new_id(), owner="k", input={}, created_at=services.store.now())
    services.store.insert(job)

    async def rounds() -> None:
        services.notifier.bind(asyncio.get_running_loop())
        for _ in range(ROUNDS):
            poll = asyncio.get_running_loop().create_task(wait_until_done(services, job.id, 30.0))
            # Until it waits for the job's change (its read of the job done), not sooner: a
            # cancel during the read is no race.
            await _until(lambda poll=poll: _waiting_for_a_wake_up(poll), "the long-poll waits for its job")
            services.notifier.publish(JobEvent(job.id, "succeeded"))  # its wake-up ...
            poll.cancel()  # ... and the shutdown's cancel, in one turn
            # Wait without cancelling it again (awaiting the task would): a swallowed cancel
            # shows as a poll still running, waiting out its 30 s.
            await asyncio.wait({poll}, timeout=5)
            assert poll.done(), "the long-poll swallowed its cancellation and went on"
            assert poll.cancelled(), "the long-poll ended without its cancellation"

    try:
        asyncio.run(rounds())
    finally:
        services.close()


def test_a_long_poll_answers_from_its_jobs_end_event_without_reading_the_store(tmp_path: Path) -> None:
    """The end's event carries the job: the poll it wakes answers with that, no read (here
    the store is closed by then, so a read would fail the poll)."""
    services = build_services(Settings(data_dir=tmp_path), lambda *_: ThreadWorkers())
    job = Job(id=new_id(), owner="k", input={}, created_at=services.store.now())
    services.store.insert(job)
    ended = Job(
        id=job.id, owner="k", input={}, created_at=job.created_at, status=Status.SUCCEEDED, output=["x.webp"]
    )

    async def poll() -> Job | None:
        services.notifier.bind(asyncio.get_running_loop())
        task = asyncio.get_running_loop().create_task(wait_until_done(services, job.id, 30.0))
        await _until(lambda: _waiting_for_a_wake_up(task), "the long-poll waits for its job")
        services.store.close()  # from here, any read of the store fails
        services.notifier.publish(JobEvent.of(ended))
        async with asyncio.timeout(5):
            return await task

    try:
        answered = asyncio.run(poll())
        assert answered == ended
    finally:
        services.close()
