"""The event bus contract, against every implementation: what one side publishes, every
listener hears, promptly, in order, and one broken listener harms no other."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from fluxredux.backends.redis.events import RedisEventBus, RedisEventPublisher
from fluxredux.backends.sqlite.events import PipeEventBus, PipePublisher
from fluxredux.jobs.events import EventBus, EventPublisher, JobEvent, LocalEventBus
from tests.services import free_port, redis_server


@contextmanager
def local_bus() -> Iterator[tuple[EventBus, EventPublisher]]:
    bus = LocalEventBus()
    yield bus, bus
    bus.close()


@contextmanager
def pipe_bus() -> Iterator[tuple[EventBus, EventPublisher]]:
    """The server's bus, and a worker's end of a pipe attached to it (as a child has)."""
    bus = PipeEventBus()
    read_fd, write_fd = os.pipe()
    reader = bus.attach(read_fd)
    publisher = PipePublisher.from_fd(write_fd)
    yield bus, publisher
    publisher.close()  # closes write_fd: the reader sees the end of the pipe
    reader.join(5)
    bus.close()


@contextmanager
def redis_bus(request: pytest.FixtureRequest) -> Iterator[tuple[EventBus, EventPublisher]]:
    """An API node's bus and a worker's publisher on another machine: two clients."""
    # Asked for only here, so that the other backends' tests never start redis-server.
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    bus = RedisEventBus(url, prefix=prefix)
    publisher = RedisEventPublisher(url, prefix=prefix)
    yield bus, publisher
    publisher.close()
    bus.close()


# Each implementation: the test's request -> a context giving (the bus listeners subscribe
# to, a publisher).
BUSES: dict[
    str, Callable[[pytest.FixtureRequest], AbstractContextManager[tuple[EventBus, EventPublisher]]]
] = {
    "local": lambda _: local_bus(),
    "pipe": lambda _: pipe_bus(),
    "redis": redis_bus,
}


@pytest.fixture(params=sorted(BUSES))
def bus(request: pytest.FixtureRequest) -> Iterator[tuple[EventBus, EventPublisher]]:
    with BUSES[request.param](request) as pair:
        yield pair


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

    def wait_for(self, count: int, timeout: float = 5) -> list[JobEvent]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.events) >= count, timeout), self.events
            return list(self.events)


def test_every_listener_hears_every_event_in_order(bus: tuple[EventBus, EventPublisher]) -> None:
    subscriber, publisher = bus
    first, second = Heard(), Heard()
    subscriber.add_listener(first)
    subscriber.add_listener(second)
    sent = [JobEvent(f"job{i}", status) for i in range(20) for status in ("processing", "succeeded")]
    for event in sent:
        publisher.publish(event)
    assert first.wait_for(len(sent)) == sent
    assert second.wait_for(len(sent)) == sent


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
    assert heard.wait_for(2) == [JobEvent("a", "succeeded"), JobEvent("b", "failed")]


def test_events_from_a_worker_process_reach_the_server_bus() -> None:
    """The embedded mode for real: a child process publishes on its inherited pipe."""
    bus = PipeEventBus()
    heard = Heard()
    bus.add_listener(heard)
    read_fd, write_fd = os.pipe()
    reader = bus.attach(read_fd)
    code = (
        "import os, sys\n"
        "from fluxredux.jobs.events import JobEvent, PipePublisher\n"
        "out = PipePublisher.from_fd(int(sys.argv[1]))\n"
        "for i in range(3): out.publish(JobEvent(f'job{i}', 'succeeded'))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(write_fd)], pass_fds=(write_fd,), check=True)
    os.close(write_fd)
    assert [e.job_id for e in heard.wait_for(3)] == ["job0", "job1", "job2"]
    reader.join(5)
    assert not reader.is_alive()  # the pipe closed with its writer: the reader ends too


def test_publishing_to_a_closed_pipe_does_not_raise() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    publisher = PipePublisher.from_fd(write_fd)
    publisher.publish(JobEvent("a", "succeeded"))  # the server is gone: the store has the truth
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
            while len(heard.events) < 2 and time.monotonic() < deadline:
                publisher.publish(JobEvent("after", "succeeded"))  # until resubscribed
                time.sleep(0.1)
            assert [e.job_id for e in heard.events][:2] == ["before", "after"]
    finally:
        publisher.close()
        bus.close()
