"""The worker's two long-lived threads: the lease keeper (worker/leases.py) renews every
held job on its own schedule and none after its release; the post-stage slot
(worker/overlap.py) runs one work at a time on one reused thread. Both end when idle and
start again with the next job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fluxredux.jobs.job import Job
from fluxredux.worker.leases import LeaseKeeper
from fluxredux.worker.overlap import PostStageSlot


def _job(job_id: str) -> Job:
    return Job(id=job_id, owner="k", input={}, created_at=0.0)


def _recorder(renewed: list[str]) -> Callable[[Job], bool]:
    def renew(job: Job) -> bool:
        renewed.append(job.id)
        return True

    return renew


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_keeper_renews_each_held_job_until_its_release() -> None:
    renewed: list[str] = []
    keeper = LeaseKeeper(_recorder(renewed), every=0.05, idle_seconds=0.2)
    release_a = keeper.hold(_job("a"))
    release_b = keeper.hold(_job("b"))
    _until(lambda: renewed.count("a") >= 2 and renewed.count("b") >= 2)
    release_a()
    after_release = renewed.count("a")
    _until(lambda: renewed.count("b") >= after_release + 3)
    assert renewed.count("a") == after_release  # none after its release returned
    release_b()
    assert keeper.held == 0


def test_the_keeper_stops_renewing_a_job_that_is_no_longer_ours() -> None:
    calls: list[str] = []

    def renew(job: Job) -> bool:
        calls.append(job.id)
        return False  # taken back (reaped, canceled)

    keeper = LeaseKeeper(renew, every=0.02, idle_seconds=0.2)
    release = keeper.hold(_job("lost"))
    _until(lambda: keeper.held == 0)
    time.sleep(0.1)
    assert calls == ["lost"]
    release()  # still safe to call


def test_a_release_waits_for_a_renewal_under_way() -> None:
    entered, finish = threading.Event(), threading.Event()
    done: list[str] = []

    def renew(job: Job) -> bool:
        entered.set()
        finish.wait(5)
        done.append(job.id)
        return True

    keeper = LeaseKeeper(renew, every=0.01, idle_seconds=0.2)
    release = keeper.hold(_job("slow"))
    assert entered.wait(5)
    releasing = threading.Thread(target=release)
    releasing.start()
    time.sleep(0.05)
    assert releasing.is_alive()  # held up by the renewal in progress
    finish.set()
    releasing.join(5)
    assert not releasing.is_alive() and done == ["slow"]


def test_the_keeper_s_thread_ends_when_idle_and_comes_back() -> None:
    renewed: list[str] = []
    # A name of its own: other tests in this process may have keepers ("leases") running.
    keeper = LeaseKeeper(_recorder(renewed), every=0.02, idle_seconds=0.05, name="leases-idle-test")
    keeper.hold(_job("first"))()
    _until(lambda: not any(t.name == "leases-idle-test" and t.is_alive() for t in threading.enumerate()))
    release = keeper.hold(_job("second"))
    _until(lambda: "second" in renewed)
    release()


def test_the_slot_runs_one_work_at_a_time_on_one_thread() -> None:
    slot = PostStageSlot(name="test-slot", idle_seconds=1.0)
    threads: list[int] = []
    running = threading.Lock()
    overlapped: list[bool] = []

    def work() -> None:
        if not running.acquire(blocking=False):
            overlapped.append(True)
            return
        try:
            threads.append(threading.get_ident())
            time.sleep(0.01)
        finally:
            running.release()

    for _ in range(5):
        slot.start(work)
    slot.wait()
    assert not overlapped and len(threads) == 5
    assert len(set(threads)) == 1  # one thread, reused


def test_the_slot_survives_a_failing_work_and_its_thread_ends_when_idle() -> None:
    slot = PostStageSlot(name="test-slot-idle", idle_seconds=0.05)
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("a post stage bug")

    slot.start(fail)  # logged, not raised
    slot.start(lambda: ran.append("after"))
    slot.wait()
    assert ran == ["after"]
    _until(lambda: not any(t.name == "test-slot-idle" and t.is_alive() for t in threading.enumerate()))
    slot.start(lambda: ran.append("again"))
    slot.wait()
    assert ran == ["after", "again"]
    assert slot.wait() == 0.0  # nothing running
