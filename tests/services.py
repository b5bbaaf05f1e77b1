"""Real backing services for the scale-out tests, started on free loopback ports and
stopped afterwards: `redis-server` (Debian's package; scripts/test installs it) and an
S3-compatible server (moto's server mode, from PyPI). Nothing is downloaded at test time."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

# Ports handed out for a server to bind later lie below Linux's ephemeral range (32768 and
# up, where every bind to port 0 lands: the tests' webhook receivers, the kernel's outgoing
# connections): a port picked there, then released, could be taken by one of those before
# the server bound it (a webhook receiver once answered a server's health polls with 501).
# Each xdist worker takes its own slice, in turn, so two tests never get the same port.
_PORT_SLICE = 2000
_FIRST_PORT = 20000
_ports = itertools.count()


def free_port() -> int:
    """A loopback port that nothing listens on now, for a server started next."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = _FIRST_PORT + (int(worker) if worker.isdigit() else 0) % 6 * _PORT_SLICE
    for _ in range(_PORT_SLICE):
        port = base + next(_ports) % _PORT_SLICE
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (a server of an earlier test still up, another program)
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + _PORT_SLICE - 1}")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s") from None
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _redis_command(data_dir: Path, port: int, appendonly: bool, extra_args: Sequence[str]) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: scripts/test installs it (apt-get install redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    return [*args, *extra_args]


@contextmanager
def redis_server(
    data_dir: Path, *, appendonly: bool = False, port: int | None = None, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """A real redis-server on a free loopback port; yields its URL. With ``appendonly``,
    every write is fsynced to an AOF file under ``data_dir`` (restart-safe); without it,
    nothing is persisted at all (no AOF, no RDB snapshots). ``extra_args``: more flags."""
    port = port or free_port()
    command = _redis_command(data_dir, port, appendonly, extra_args)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


class RedisProcess:
    """A redis-server a test kills (SIGKILL, as a crash or an OOM kill does) and starts
    again on the same port with the same dir and flags; stop it in a ``finally``."""

    def __init__(self, data_dir: Path, *, appendonly: bool, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = _redis_command(data_dir, self.port, appendonly, extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        assert self._process is None, "already running"
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self._process, "redis-server")
        return self.url

    def kill(self) -> None:
        """kill -9: whatever Redis holds only in memory is gone."""
        assert self._process is not None, "not running"
        self._process.kill()
        self._process.wait()
        self._process = None

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
            self._process = None


@contextmanager
def s3_server(*, port: int | None = None) -> Iterator[str]:
    """moto's S3-compatible server (in-memory) on a free loopback port; yields its endpoint
    URL. Its buckets vanish with it; tests keep apart by bucket."""
    with s3_server_process(port=port) as (url, _process):
        yield url


@contextmanager
def s3_server_process(*, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``s3_server``, yielding its process too: for tests that freeze it (SIGSTOP: it still
    accepts connections, the kernel completes them, and then answers nothing)."""
    binary = Path(sys.executable).with_name("moto_server")  # the console script beside this python
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    port = port or free_port()
    process = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port, process, "moto_server")
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        _stop(process)


def unreachable_redis_url() -> str:
    """A Redis URL where nothing listens (a port just found free on loopback)."""
    return f"redis://127.0.0.1:{free_port()}/0"


def assert_each_unavailable_quickly(calls: list[Callable[[], object]], within: float = 3.0) -> None:
    """Every call raises StoreUnavailable naming Redis within ``within`` seconds: a Redis
    that is down costs a caller a quick 503, never a hang and never a raw error (a 500)."""
    from fluxredux.errors import StoreUnavailable

    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Redis"):
            call()
        assert time.monotonic() - started < within
