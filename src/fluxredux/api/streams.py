"""Event streams (Server-Sent Events) of one prediction: what both surfaces share.

A stream follows one job. Each event of the job on the bus (from a worker anywhere: a
child's pipe, or Redis in scale-out) wakes it; it reads the job and tells its client the
moments passed since the last one it told: queued (with the queue position), started,
each denoising step, each preview, the phases after the last step, the end. Each surface
words the moments its own way (``render_stream`` in eachlabs/ and replicate/).

Every moment has a key that orders it within the job, and the key is the event's id:
``attempt.stage.step.sub``. A client that reconnects with ``Last-Event-ID`` gets every
moment after it, steps included (the job's progress says how far it got, so the steps in
between are told even when their events were missed). Only the latest preview is kept
(the job holds one), so a missed preview is skipped, never a step or the end. A queued
job's position is re-read every second, as no event says it moved.

Streams are bounded per API node: per key and in all (``TooManyStreams``, a 429). They
end with the job, or when the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Header
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from fluxredux.api.eachlabs.render import running_phase
from fluxredux.api.services import Services
from fluxredux.jobs.job import Job, Status

# attempt, stage, step, sub: compared as a tuple (see the module's docstring).
EventKey = tuple[int, int, int, int]
QUEUED, RUNNING, AFTER_STEPS, OUTPUTS, ENDED = 0, 1, 2, 3, 4
END_ATTEMPT = 1_000_000  # the end sorts after every attempt's moments
QUEUE_SPAN = 1_000_000  # a queued moment's sub: a lower position sorts later
KEEP_ALIVE_SECONDS = 15.0  # a comment line this often: proxies close silent connections
# The phases after the last step, in the order a run goes through them (the worker's
# pipeline.protocol.Phase; not imported: that module brings numpy into the HTTP process).
PHASE_ORDER = ("decoding", "safety check", "encoding", "storing")
QUEUED_RECHECK_SECONDS = 1.0  # how often a queued job's position is read again
RUNNING_RECHECK_SECONDS = 5.0  # a read without a wake-up: a lost event costs latency only

MomentKind = Literal["queued", "started", "step", "preview", "phase", "output", "end"]


@dataclass(frozen=True)
class Moment:
    key: EventKey
    kind: MomentKind
    job: Job
    queue_position: int | None = None
    step: int = 0
    total: int = 0
    output: str | None = None  # an "output" moment's file (one per image, just before the end)

    @property
    def id(self) -> str:
        return ".".join(str(part) for part in self.key)


def parse_event_id(text: str | None) -> EventKey | None:
    """A ``Last-Event-ID`` as a key; None for none or anything that is not one of ours."""
    parts = (text or "").split(".")
    if len(parts) != 4 or not all(part.isdigit() and len(part) <= 9 for part in parts):
        return None
    a, b, c, d = (int(part) for part in parts)
    return a, b, c, d


def moments(job: Job, queue_position: int | None, *, resumed: bool) -> Iterator[Moment]:
    """The moments ``job`` (as read now) has reached. Fresh (not ``resumed``): its state
    now only. Resumed: all of its last attempt's steps too, for the caller to keep those
    after the client's last event."""
    if job.status == Status.STARTING:
        attempt = job.attempt + 1  # the attempt it waits for
        position = queue_position if queue_position is not None else 0
        yield Moment((attempt, QUEUED, 0, QUEUE_SPAN - min(position, QUEUE_SPAN)), "queued", job, position)
        return
    attempt = job.attempt
    total = job.progress_total or int(job.input.get("num_inference_steps", 4))
    if job.status == Status.PROCESSING or resumed:
        if job.started_at is not None and attempt > 0:
            yield Moment((attempt, RUNNING, 0, 0), "started", job)
        first = 1 if resumed else job.progress_step
        for step in range(max(first, 1), job.progress_step + 1):
            yield Moment((attempt, RUNNING, step, 0), "step", job, step=step, total=total)
        if job.status == Status.PROCESSING and job.progress_preview is not None and job.progress_step:
            # Only the latest is kept: one missed while the client was away is not told.
            yield Moment((attempt, RUNNING, job.progress_step, 1), "preview", job, step=job.progress_step)
        if (phase := running_phase(job)) is not None:
            order = PHASE_ORDER.index(phase) if phase in PHASE_ORDER else 0
            yield Moment((attempt, AFTER_STEPS, 0, order), "phase", job, total=total)
    if job.status == Status.SUCCEEDED:
        for index, name in enumerate(job.output):
            yield Moment((END_ATTEMPT, OUTPUTS, 0, index), "output", job, output=name)
    if job.is_terminal:
        yield Moment((END_ATTEMPT, ENDED, 0, 0), "end", job)


async def follow(services: Services, job: Job, last_event_id: str | None) -> AsyncIterator[Moment]:
    """The moments of ``job`` (already read and checked to be the caller's) after
    ``last_event_id``, as they happen; it ends after the job's end (or its deletion).
    Bare wake-ups re-read the job (shared with whoever reads it at that moment); an end's
    event carries the job."""
    after = parse_event_id(last_event_id)
    resumed = after is not None
    waiter = services.notifier.watch(job.id)
    try:
        # Read again now that changes wake us: one landing since the caller's read is seen.
        current = await services.job_reads.get(job.id, after=time.monotonic())
        while current is not None:
            position = None
            if current.status == Status.STARTING:
                position = await services.read(services.lifecycle.queue_position, current.id)
            for moment in moments(current, position, resumed=resumed):
                if after is None or moment.key > after:
                    after = moment.key
                    yield moment
            if current.is_terminal:
                return
            resumed = True  # from the first read on, every step since counts
            recheck = QUEUED_RECHECK_SECONDS if current.status == Status.STARTING else RUNNING_RECHECK_SECONDS
            # asyncio.timeout, not wait_for: a shutdown's cancel must end the stream (gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(recheck):
                    await waiter.wait()
            # Taken before the read: a change that lands after it still wakes the next wait.
            ended = waiter.take()
            current = ended or await services.job_reads.get(job.id, after=time.monotonic())
    finally:
        services.notifier.unwatch(job.id, waiter)


# What a reconnecting EventSource sends: the id of the last event it got.
LastEventIdHeader = Annotated[
    str | None, Header(alias="Last-Event-ID", max_length=64, description="Resume after this event.")
]

# One moment as a surface words it: none, one or more events.
Render = Callable[[Moment], list[ServerSentEvent]]


def event_stream(
    services: Services, job: Job, key_id: str, last_event_id: str | None, render: Render
) -> EventSourceResponse:
    """The response of a stream of ``job`` (the caller's, read already): its moments as
    ``render`` words them, a keep-alive comment every 15 s. TooManyStreams (before any
    byte is sent) when the key or this node has no stream to spare."""
    release = services.streams.take(key_id)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for moment in follow(services, job, last_event_id):
                for event in render(moment):
                    yield event
        finally:
            release()

    # Closed with a background task too: a response cut before its first byte never runs
    # the generator, whose finally would release the slot.
    return EventSourceResponse(
        events(),
        ping=KEEP_ALIVE_SECONDS,
        headers={"Cache-Control": "no-store"},
        background=BackgroundTask(release),
    )
