"""Starts the worker process, watches it and restarts it when it dies.

Runs inside ``fluxredux serve``, one supervisor per local worker (``--workers N``);
imports no torch (the model lives in the child). The child talks to the store, the
registry and the event bus itself, as a worker on another machine does. This process
starts it (handing it its id, over stdin wake-ups for new jobs and, in the embedded mode,
an event pipe that it attaches to the server's bus), reads the child's registry entry to
report its state, and, having seen it die, recovers its job at once instead of waiting
for the lease to run out.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fluxredux.backends.sqlite.events import PipeEventBus
from fluxredux.config import Settings
from fluxredux.errors import FluxReduxError, ModelUnavailable, NoWorker, StoreUnavailable
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.registry import WorkerRegistry, new_worker_id
from fluxredux.worker.monitor import loaded_adapters
from fluxredux.worker.process import EXIT_MODEL_FAILED

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What /health and /ready report about the worker process and its model."""

    pid: int | None = None
    worker_id: str | None = None
    alive: bool = False  # a worker process is running (loading the model, or ready)
    ready: bool = False  # ... and its model is loaded
    model: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # the model could not be loaded
    restarts: int = 0
    exits_before_ready: int = 0  # in a row: a worker that keeps dying while it starts
    down_since: float | None = None  # monotonic; while no process runs
    next_start_at: float | None = None  # monotonic; when the next start is due
    storage_error: str | None = None  # the worker could not write outputs
    loras: list[str] = field(default_factory=list)  # the style adapters it has loaded now
    previews: bool = False  # whether its model makes step previews (TAEF1 is there)
    supervisor_error: str | None = None  # the last thing that went wrong here
    # Why the worker is not started again: it exited at start because its model (or a
    # package it needs) cannot be imported or loaded, which no restart changes.
    cannot_start: str | None = None
    announced: bool = False  # the model's notice is in the log (once per server start)


# Exits in a row, before the model is ready, after which creates are refused.
CRASH_LOOP = 3
# Slack on top of the restart backoff before "no worker started in time" is declared.
START_GRACE_SECONDS = 5.0
NOT_RESTARTED = "it is not restarted: fix that, then restart the server"


class WorkerSupervisor:
    """Runs one worker child and keeps it running. Its loop survives any exception (a
    store that is locked while a dead worker's job is recovered, a failed spawn): it
    logs, backs off and tries again, and says so through ``problems()``."""

    def __init__(
        self,
        settings: Settings,
        lifecycle: Lifecycle,
        events: PipeEventBus | None,
        registry: WorkerRegistry,
        *,
        index: int = 0,
        command: Sequence[str] = (sys.executable, "-m", "fluxredux.worker.child"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        # Embedded: the child's job events arrive on a pipe, attached to this bus. None:
        # the child publishes them itself (Redis), where every node hears them.
        self.events = events
        self.index = index  # which of this machine's workers (and GPUs) it is
        self.registry = registry  # the child reports its state there, as any worker does
        self.command = list(command)
        self.clock = clock
        self.state = WorkerState(down_since=clock())
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._delay = 1.0
        self._dead_owners: set[str] = set()  # workers whose jobs still await recovery

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._thread.start()

    # --- WorkerMonitor --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "ready": state.ready,
            "alive": state.alive,
            "pid": state.pid,
            "restarts": state.restarts,
            "error": state.error,
            "storage_error": state.storage_error,
            "cannot_start": state.cannot_start,
            "loras": state.loras,
            "previews": state.previews,
            **state.model,
        }

    def problems(self) -> list[str]:
        state, now = self.state, self.clock()
        if state.cannot_start:
            return [f"the worker cannot start: {state.cannot_start}; {NOT_RESTARTED}"]
        found = []
        if self._thread is None or not self._thread.is_alive():
            found.append("the worker supervisor is not running: no worker will be started")
        elif not state.alive:
            due = state.next_start_at
            when = f"; next start in {max(0.0, due - now):.0f} s" if due is not None else ""
            found.append(f"no worker process is running{when}")
        if state.error and not state.ready:
            found.append(f"the model could not be loaded: {state.error.get('error', 'unknown error')}")
        if state.storage_error:
            found.append(f"the worker cannot store outputs: {state.storage_error}")
        return found

    def refusal(self) -> FluxReduxError | None:
        state, now = self.state, self.clock()
        if state.cannot_start:
            # No Retry-After: a retry cannot succeed before someone fixes it and restarts.
            return ModelUnavailable(f"the worker cannot start: {state.cannot_start}; {NOT_RESTARTED}")
        if state.error and not state.ready:
            # Queueing work that no worker can run would only hide the problem.
            return ModelUnavailable(
                f"the model is not available: {state.error.get('error', 'it failed to load')}",
                retry_after=30,
            )
        if self._thread is None or not self._thread.is_alive():
            return NoWorker("no worker can be started (its supervisor stopped); see the server log")
        if state.exits_before_ready >= CRASH_LOOP:
            return NoWorker(
                f"the worker exited {state.exits_before_ready} times in a row while starting; "
                "see the server log",
                retry_after=self._delay,
            )
        overdue = state.down_since is not None and now - state.down_since > self._delay + START_GRACE_SECONDS
        if not state.alive and overdue:
            assert state.down_since is not None
            return NoWorker(
                f"no worker has been running for {now - state.down_since:.0f} s; see the server log",
                retry_after=self._delay,
            )
        return None

    def wake(self) -> None:
        """Tell the worker a job was queued (it also polls, so a lost wake-up only delays)."""
        with self._lock:
            process = self._process
            if process is None or process.stdin is None:
                return
            try:
                process.stdin.write(b"\n")
                process.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass

    # --- running the child ----------------------------------------------------------

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._thread is not None:
            self._thread.join(timeout)

    def _spawn(self, worker_id: str) -> tuple[subprocess.Popen[bytes], int | None]:
        env = {**os.environ, **settings_env(self.settings), "FLUXREDUX_WORKER_ID": worker_id}
        if self.settings.local_workers > 1 and self.settings.device is None:
            gpu = gpu_of(self.index, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
        if self.events is None:
            return subprocess.Popen(self.command, stdin=subprocess.PIPE, env=env), None
        read_fd, write_fd = os.pipe()
        env["FLUXREDUX_EVENT_FD"] = str(write_fd)
        try:
            process = subprocess.Popen(self.command, stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return process, read_fd

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            started = self.clock()
            code: int | None = None
            try:
                code = self._run_child()
            except Exception as exc:  # a failed spawn, a broken pipe: never the end of supervision
                self.state.supervisor_error = f"{type(exc).__name__}: {exc}"
                log.exception("could not run the worker process")
                self._kill_child()  # whatever happened, never two workers (two models in memory)
            if self._stopping.is_set():
                return
            self._recover_jobs()
            if code == EXIT_MODEL_FAILED:  # only ever before the model was ready (process.py)
                # Restarting would fail the same way, every 30 s, for ever (and load the
                # model's packages each time): say why once, and stop.
                self.state.cannot_start = self._why_it_cannot_start()
                self.state.next_start_at = None
                log.error("the worker cannot start: %s; %s", self.state.cannot_start, NOT_RESTARTED)
                return
            self.state.restarts += 1
            # Back off when it dies young (a model that cannot load), not after long runs.
            self._delay = 1.0 if self.clock() - started > 60 else min(self._delay * 2, 30.0)
            self.state.next_start_at = self.clock() + self._delay
            log.error("restarting the worker process in %.0f s", self._delay)
            self._stopping.wait(self._delay)

    def _kill_child(self) -> None:
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        state = self.state
        if state.alive:
            state.alive = state.ready = False
            state.down_since = self.clock()
            if state.worker_id:
                self._dead_owners.add(state.worker_id)

    def _why_it_cannot_start(self) -> str:
        """The worker's last word (in the registry), else what its exit code means."""
        error = self.state.error or {}
        return str(error.get("error") or "its model cannot be loaded (exit code 3); see the log above")

    def _run_child(self) -> int:
        """Start the worker, watch it until it exits (its exit code), and note what is
        needed to recover."""
        worker_id = new_worker_id()
        process, read_fd = self._spawn(worker_id)
        with self._lock:
            self._process = process
        state = self.state
        state.pid, state.worker_id, state.alive, state.down_since = process.pid, worker_id, True, None
        # A new worker reports its own storage trouble; an old report would keep /ready
        # failing for good, since only the worker that saw it could clear it.
        state.next_start_at = state.storage_error = None
        reader = self.events.attach(read_fd) if self.events is not None and read_fd is not None else None
        retry_recovery_at = self.clock() + 5
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                self._read_registry(worker_id)
                if self.clock() >= retry_recovery_at:  # a recovery that failed earlier (store locked)
                    retry_recovery_at = self.clock() + 5
                    self._recover_jobs()
        if reader is not None:
            reader.join(5)
        self._read_registry(worker_id)  # its last word (a model that failed to load) before it goes
        if not state.ready:
            state.exits_before_ready += 1
        state.alive = state.ready = False
        state.down_since = self.clock()
        self._dead_owners.add(worker_id)
        if not self._stopping.is_set():
            log.error("the worker process exited (code %s)", code)
        return code

    def _read_registry(self, worker_id: str) -> None:
        """What the worker says about itself, as every worker says it: in the registry."""
        try:
            found = [w for w in self.registry.workers() if w.id == worker_id]
        except StoreUnavailable:
            return  # the next look will do; what we knew stays
        if not found:
            return
        worker, state = found[0], self.state
        details = worker.details
        state.storage_error = details.get("storage_error")
        state.loras = loaded_adapters(details)
        state.previews = details.get("previews") is True
        if worker.state == "ready" and not state.ready:
            state.model = {"description": worker.model, "demo": details.get("demo", False)}
            state.model["notice"] = details.get("notice")
            state.ready, state.error, state.exits_before_ready = True, None, 0
            if state.announced:  # a restart: the same model, already announced
                log.info("the worker process is ready again (pid %s)", state.pid)
                return
            state.announced = True
            log.info("model ready: %s", worker.model)
            if state.model["notice"]:  # "demo model: random weights, outputs are noise"
                log.warning("%s", state.model["notice"])
        elif worker.state == "failed" and state.error is None:
            # Said in the log as the supervisor gives up on it (``_supervise``), once.
            state.error = details.get("error") or {"error": "the model could not be loaded"}

    def _recover_jobs(self) -> None:
        """A dead worker's job is re-run once, then failed as "worker lost". If the store
        cannot be written now, keep the owners and try again later (the lease expiry
        recovers the jobs anyway, through the server's maintenance)."""
        if not self._dead_owners:
            return
        try:
            self.lifecycle.reap(max_attempts=self.settings.max_attempts, dead_owners=set(self._dead_owners))
            for worker_id in self._dead_owners:  # we saw them die: no need to wait for their silence
                self.registry.unregister(worker_id)
        except Exception as exc:
            self.state.supervisor_error = f"recovering the jobs of a dead worker failed: {exc}"
            log.warning("%s; will retry", self.state.supervisor_error)
            return
        self._dead_owners.clear()


def gpu_of(index: int, visible: str | None) -> str | None:
    """The GPU of the ``index``-th local worker: the index-th of those this server may use
    (``CUDA_VISIBLE_DEVICES``; all of them when unset). None: leave the variable as it is
    (set but empty means no GPU for anyone). With fewer GPUs than workers the first GPUs
    are handed out again, two models sharing one: ``serve`` warns of it at start."""
    if visible is None:
        return str(index)
    gpus = [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    return gpus[index % len(gpus)] if gpus else None


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as FLUXREDUX_* variables, for the child process."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"FLUXREDUX_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env
