"""Starts the worker process, restarts it when it dies, and relays its events.

Runs inside ``fluxredux serve``; imports no torch (the model lives in the child).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluxredux.config import Settings
from fluxredux.events import JobEvent
from fluxredux.jobs import Lifecycle

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What /health reports about the model."""

    pid: int | None = None
    worker_id: str | None = None
    ready: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    restarts: int = 0


class WorkerSupervisor:
    def __init__(
        self, settings: Settings, lifecycle: Lifecycle, on_event: Callable[[JobEvent], None]
    ) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.on_event = on_event
        self.state = WorkerState()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._thread.start()

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

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, **settings_env(self.settings), "FLUXREDUX_EVENT_FD": str(write_fd)}
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxredux.worker.child"],
            stdin=subprocess.PIPE,
            pass_fds=(write_fd,),
            env=env,
        )
        os.close(write_fd)
        return process, read_fd

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            process, read_fd = self._spawn()
            with self._lock:
                self._process = process
            self.state.pid = process.pid
            reader = threading.Thread(target=self._read_events, args=(read_fd,), daemon=True)
            reader.start()
            code = process.wait()
            reader.join(5)
            self.state.ready = False
            if self._stopping.is_set():
                return
            log.error("the worker process exited (code %s); restarting it", code)
            if self.state.worker_id:
                # Its job is re-run once, then failed as "worker lost": nothing stays processing.
                self.lifecycle.reap(
                    max_attempts=self.settings.max_attempts, dead_owners={self.state.worker_id}
                )
            self.state.restarts += 1
            # Back off when it dies young (a model that cannot load), not after long runs.
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            self._stopping.wait(delay)

    def _read_events(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r") as stream:
            for line in stream:
                kind, _, payload = line.rstrip("\n").partition(" ")
                try:
                    self._handle(kind, payload)
                except Exception:
                    log.exception("bad message from the worker: %r", line[:200])

    def _handle(self, kind: str, payload: str) -> None:
        if kind == "job":
            job_id, status = payload.split(" ", 1)
            self.on_event(JobEvent(job_id, status))
        elif kind == "hello":
            self.state.worker_id = payload
        elif kind == "ready":
            self.state.model = json.loads(payload)
            self.state.ready, self.state.error = True, None
            if self.state.model.get("demo"):
                log.warning("MODEL: %s", self.state.model["description"])
            else:
                log.info("model ready: %s", self.state.model["description"])
        elif kind == "failed":
            self.state.error = json.loads(payload)
            log.error("the model could not be loaded: %s", self.state.error.get("error"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as FLUXREDUX_* variables, for the child process."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"FLUXREDUX_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env
