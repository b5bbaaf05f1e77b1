"""A scale-out deployment of real processes for tests: API nodes (`fluxredux serve
--redis URL --workers 0`) and GPU workers (`fluxredux worker --redis URL`), each with
its own data dir and log, sharing one Redis (a key prefix of the test's own) and one
storage URL, as on many machines.

Every process is started by the real command line and stopped (or killed, or frozen)
for real; the test reads the same HTTP API a user does and Redis itself where it must
check what no API shows (how many times a job ran).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import FLUXREDUX, TERMINAL, png_data_uri
from tests.services import free_port

__all__ = ["FLUXREDUX", "TERMINAL", "Cluster", "Node", "Proc", "cluster", "wait_for"]


def wait_for(what: Callable[[], bool], timeout: float, message: Callable[[], str] | str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.05)


@dataclass
class Proc:
    """One process of the deployment, with its log."""

    name: str
    process: subprocess.Popen[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            # SIGCONT first: a frozen process cannot act on SIGTERM.
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Node(Proc):
    """An API node: the HTTP API a client talks to."""

    url: str = ""
    key: str = ""

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    def body(self, **inputs: Any) -> dict[str, Any]:
        return {"model": "flux-redux-schnell", "input": {"redux_image": png_data_uri(), **inputs}}

    def create(self, timeout: float = 30, **inputs: Any) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/prediction/", json=self.body(**inputs), headers=self.headers(), timeout=timeout
        )

    def create_id(self, **inputs: Any) -> str:
        response = self.create(**inputs)
        assert response.status_code == 200, response.text
        return str(response.json()["predictionID"])

    def get(self, prediction_id: str, wait: float = 0) -> dict[str, Any]:
        response = httpx.get(
            f"{self.url}/v1/prediction/{prediction_id}",
            params={"wait": wait},
            headers=self.headers(),
            timeout=wait + 10,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def cancel(self, prediction_id: str) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/v1/prediction/{prediction_id}/cancel", headers=self.headers(), timeout=10
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def ready(self) -> httpx.Response:
        return httpx.get(self.url + "/ready", timeout=10)

    def wait_status(self, prediction_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self.get(prediction_id))
            return found["status"] in statuses

        wait_for(reached, timeout, lambda: f"{prediction_id} never reached {statuses}: {found}")
        return found


@dataclass
class Cluster:
    """Processes sharing one Redis (``prefix`` keeps this test's keys apart) and storage."""

    root: Path
    redis_url: str
    prefix: str
    storage: str
    env: dict[str, str] = field(default_factory=dict)  # FLUXREDUX_* for every process
    key: str = ""
    procs: list[Proc] = field(default_factory=list)

    def _environment(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "COLUMNS": "200",
            "FLUXREDUX_REDIS_PREFIX": self.prefix,
            "FLUXREDUX_MODEL": "fake",
            **self.env,
            **(extra or {}),
        }

    def _launch(self, name: str, command: list[str], env: dict[str, str]) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("a") as out:  # the child has its own copy of the descriptor
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    def _start(self, name: str, args: list[str], extra: dict[str, str] | None) -> Proc:
        """`fluxredux ARGS` with the deployment's flags; every process its own data dir,
        as on its own machine."""
        flags = ["--redis", self.redis_url, "--storage", self.storage, "--data-dir", str(self.root / name)]
        return self._launch(name, [FLUXREDUX, *args, *flags], self._environment(extra))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`fluxredux ARGS --redis URL` with the deployment's environment (its prefix)."""
        return subprocess.run(
            [FLUXREDUX, *args, "--redis", self.redis_url],
            capture_output=True,
            text=True,
            env=self._environment(None),
            timeout=timeout,
        )

    def create_key(self) -> str:
        """An API key of the deployment, made by the real command line."""
        done = self.cli("keys", "create", "--name", "tests")
        assert done.returncode == 0, done.stderr
        self.key = done.stdout.strip().splitlines()[-1]
        return self.key

    def node(self, name: str, env: dict[str, str] | None = None) -> Node:
        port = free_port()
        started = self._start(name, ["serve", "--port", str(port), "--workers", "0"], env)
        node = Node(name, started.process, started.log, url=f"http://127.0.0.1:{port}")
        node.key = self.key or self.create_key()
        self.procs[-1] = node

        def answers() -> bool:
            assert node.alive(), node.text()
            try:
                return httpx.get(node.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 60, lambda: f"{name} did not start:\n{node.text()}")
        return node

    @staticmethod
    def _wait_ready(proc: Proc) -> Proc:
        wait_for(
            lambda: "ready:" in proc.text() or not proc.alive(),
            60,
            lambda: f"{proc.name} not ready:\n{proc.text()}",
        )
        assert proc.alive(), proc.text()
        return proc

    def worker(self, name: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> Proc:
        proc = self._start(name, ["worker"], env)
        return self._wait_ready(proc) if wait_ready else proc

    def script_worker(
        self, name: str, script: Path, env: dict[str, str] | None = None, wait_ready: bool = True
    ) -> Proc:
        """A worker started by a Python script of the test's own (``python SCRIPT``) rather
        than by `fluxredux worker`: e.g. one that builds ``WorkerProcess`` around a model
        of its own. It gets the deployment's settings as FLUXREDUX_* variables (no flags),
        its own data dir and log, and is stopped with the rest."""
        settings = {
            "FLUXREDUX_REDIS_URL": self.redis_url,
            "FLUXREDUX_STORAGE": self.storage,
            "FLUXREDUX_DATA_DIR": str(self.root / name),
        }
        proc = self._launch(name, [sys.executable, str(script)], {**self._environment(env), **settings})
        return self._wait_ready(proc) if wait_ready else proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.text()[-3000:]}" for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@contextmanager
def cluster(root: Path, redis_url: str, prefix: str, storage: str, **env: str) -> Iterator[Cluster]:
    deployment = Cluster(root, redis_url, prefix, storage, env=env)
    try:
        yield deployment
    finally:
        deployment.stop()
