"""The event bus contract, against every engine (tests/backends.py: memory, the one-machine
pipe from a worker child, Redis pub/sub): what one side publishes, every listener hears,
promptly, in order, and one broken listener harms no other."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fluxredux.backends.redis.events import RedisEventBus, RedisEventPublisher
from fluxredux.backends.sqlite.events import PipeEventBus, PipePublisher
from fluxredux.jobs.events import EventBus, EventPublisher, JobEvent
from fluxredux.jobs.job import Job, Status
from tests.backends import Engine
from tests.services import free_port, redis_server

SEAM = "bus"
# Published after what a test sends: once it is heard, anything sent before it that was
# going to arrive has arrived (each bus keeps one publisher's order), so "nothing more" is
# known without sleeping on a guess.
SENTINEL = JobEvent("sentinel", "succeeded")


@pytest.fixture
def bus(engine: Engine) -> tuple[EventBus, EventPublisher]:
    """(the bus listeners subscribe to, a publisher): on Redis two clients, on the pipe a
    worker's end of it."""
    return engine.open()


class Heard:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        self.times: list[float] = []
        self.changed = threading.Condition()

    def __call__(self, event: JobEvent) -> None:
        with self.changed:
            self.events.append(event)
            self.times.append(time.monotonic())
            self.changed.notify_all()

    def heard(self, count: int, timeout: float) -> bool:
        """Whether ``count`` events have been heard, waiting up to ``timeout`` for them."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.events) >= count, timeout)

    def wait_for(self, count: int, timeout: float = 5) -> list[JobEvent]:
        assert self.heard(count, timeout), self.events
        with self.changed:
            return list(self.events)

    def all_until(self, sentinel: JobEvent, publisher: EventPublisher, timeout: float = 5) -> list[JobEvent]:
        """Everything heard up to ``sentinel``, published now: nothing sent before it is
        still on its way, so what this returns is all that arrives (no duplicate either)."""
        publisher.publish(sentinel)
        with self.changed:
            assert self.changed.wait_for(lambda: sentinel in self.events, timeout), self.events
            return self.events[: self.events.index(sentinel)]


def test_every_listener_hears_every_event_in_order(bus: tuple[EventBus, EventPublisher]) -> None:
    subscriber, publisher = bus
    first, second = Heard(), Heard()
    subscriber.add_listener(first)
    subscriber.add_listener(second)
    sent = [JobEvent(f"job{i}", status) for i in range(20) for status in ("processing", "succeeded")]
    for event in sent:
        publisher.publish(event)
    assert first.all_until(SENTINEL, publisher) == sent  # each once, in order, nothing more
    assert second.wait_for(len(sent) + 1) == [*sent, SENTINEL]


def test_an_end_carries_the_job_as_it_ended_and_other_events_carry_none(
    bus: tuple[EventBus, EventPublisher],
) -> None:
    """What an end wakes (every long-poll of the job, its webhook) answers from the event,
    without reading the store: the job must arrive whole through every bus."""
    subscriber, publisher = bus
    heard = Heard()
    subscriber.add_listener(heard)
    ended = Job(
        id="j1",
        owner="key1",
        input={"redux_image": "file1", "num_outputs": 2},
        created_at=1700000000.25,
        status=Status.SUCCEEDED,
        output=["a.webp", "b.webp"],
        logs="seed: 7\nsafety checker removed 0 of 2 images",
        metrics={"predict_time": 0.51},
    )
    running = Job(id="j2", owner="key1", input={}, created_at=1.0, status=Status.PROCESSING)
    publisher.publish(JobEvent.of(ended))
    publisher.publish(JobEvent.of(running))
    end, step = heard.all_until(SENTINEL, publisher)
    assert (end, step) == (JobEvent("j1", "succeeded"), JobEvent("j2", "processing"))
    assert end.job == ended
    assert step.job is None


def test_a_line_whose_job_is_not_the_events_is_refused() -> None:
    other = Job(id="j2", owner="k", input={}, created_at=1.0, status=Status.FAILED)
    line = JobEvent("j1", "failed", other).encode()
    with pytest.raises(ValueError):
        JobEvent.decode(line)
    with pytest.raises(ValueError):
        JobEvent.decode('j1 failed {"id": "j1"}\n')  # JSON, but not a job's
    assert JobEvent.decode(JobEvent("j1", "failed").encode()) == JobEvent("j1", "failed")


def test_a_wake_up_arrives_within_100_ms(bus: tuple[EventBus, EventPublisher]) -> None:
    subscriber, publisher = bus
    heard = Heard()
    subscriber.add_listener(heard)
    delays = []
    for i in range(10):
        sent_at = time.monotonic()
        publisher.publish(JobEvent(f"job{i}", "succeeded"))
        heard.wait_for(i + 1)
        delays.append(heard.times[i] - sent_at)
    assert sorted(delays)[5] < 0.1, delays


def test_a_broken_listener_harms_no_other(bus: tuple[EventBus, EventPublisher]) -> None:
    subscriber, publisher = bus

    def broken(event: JobEvent) -> None:
        raise RuntimeError("a bug in one listener")

    heard = Heard()
    subscriber.add_listener(broken)
    subscriber.add_listener(heard)
    publisher.publish(JobEvent("a", "succeeded"))
    publisher.publish(JobEvent("b", "failed"))
    assert heard.all_until(SENTINEL, publisher) == [JobEvent("a", "succeeded"), JobEvent("b", "failed")]


def test_events_from_a_worker_process_reach_the_server_bus() -> None:
    """The embedded mode for real: a child process publishes on its inherited pipe."""
    bus = PipeEventBus()
    heard = Heard()
    bus.add_listener(heard)
    read_fd, write_fd = os.pipe()
    reader = bus.attach(read_fd)
    code = (
        "import os, sys\n"
        "from fluxredux.backends.sqlite.events import PipePublisher\n"
        "from fluxredux.jobs.events import JobEvent\n"
        "out = PipePublisher.from_fd(int(sys.argv[1]))\n"
        "for i in range(3): out.publish(JobEvent(f'job{i}', 'succeeded'))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(write_fd)], pass_fds=(write_fd,), check=True)
    os.close(write_fd)
    assert [e.job_id for e in heard.wait_for(3)] == ["job0", "job1", "job2"]
    reader.join(5)
    assert not reader.is_alive()  # the pipe closed with its writer: the reader ends too


def test_publishing_to_a_closed_pipe_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    """A worker whose server is gone publishes into a pipe nobody reads: harmless (the store
    has the truth). The same publisher, while the server reads, delivers each event: a
    publisher that dropped everything would pass the harmless half alone."""
    read_fd, write_fd = os.pipe()
    publisher = PipePublisher.from_fd(write_fd)
    publisher.publish(JobEvent("a", "processing"))
    ready, _, _ = select.select([read_fd], [], [], 5)
    assert ready, "the event never reached the pipe"
    assert JobEvent.decode(os.read(read_fd, 4096).decode()) == JobEvent("a", "processing")

    os.close(read_fd)  # the server is gone
    with caplog.at_level(logging.DEBUG, logger="fluxredux.backends.sqlite.events"):
        publisher.publish(JobEvent("b", "succeeded"))  # does not raise...
        publisher.publish(JobEvent("c", "succeeded"))  # ...nor does the next
    assert [
        r.getMessage() for r in caplog.records if r.name.endswith("sqlite.events")
    ] == [  # ...each seen unsent
        "event not sent: JobEvent(job_id='b', status='succeeded')",
        "event not sent: JobEvent(job_id='c', status='succeeded')",
    ]
    publisher.close()


def test_redis_publisher_pointed_at_a_closed_port_does_not_raise() -> None:
    publisher = RedisEventPublisher(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    publisher.publish(JobEvent("a", "succeeded"))  # nobody hears it: the store has the truth
    assert time.monotonic() - started < 3
    publisher.close()


def test_the_redis_bus_hears_again_after_redis_restarts(tmp_path: Path) -> None:
    """A Redis restart loses what was published meanwhile (a wake-up only), never the bus:
    its reader reconnects and subscribes again by itself."""
    port = free_port()
    with redis_server(tmp_path / "first", port=port) as url:
        bus = RedisEventBus(url, prefix="restart:")
        publisher = RedisEventPublisher(url, prefix="restart:")
        heard = Heard()
        bus.add_listener(heard)
        publisher.publish(JobEvent("before", "succeeded"))
        heard.wait_for(1)
    publisher.publish(JobEvent("while-down", "succeeded"))  # lost, and does not raise
    try:
        with redis_server(tmp_path / "second", port=port):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                publisher.publish(JobEvent("after", "succeeded"))  # until resubscribed
                if heard.heard(2, timeout=0.1):
                    break
            assert [e.job_id for e in heard.wait_for(2)][:2] == ["before", "after"]
    finally:
        publisher.close()
        bus.close()
