"""Real backing services for the scale-out tests, started on free loopback ports and
stopped afterwards: `redis-server` (Debian's package; scripts/test installs it) and an
S3-compatible server (moto's server mode, from PyPI). Nothing is downloaded at test time."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@contextmanager
def redis_server(data_dir: Path, *, appendonly: bool = False, port: int | None = None) -> Iterator[str]:
    """A real redis-server on a free loopback port; yields its URL. With ``appendonly``,
    every write is fsynced to an AOF file under ``data_dir`` (restart-safe)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: scripts/test installs it (apt-get install redis-server)")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


@contextmanager
def s3_server(*, port: int | None = None) -> Iterator[str]:
    """moto's S3-compatible server (in-memory) on a free loopback port; yields its endpoint
    URL. Its buckets vanish with it; tests keep apart by bucket."""
    binary = Path(sys.executable).with_name("moto_server")  # the console script beside this python
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    port = port or free_port()
    process = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port, process, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
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
