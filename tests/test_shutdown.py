"""Stopping the server is bounded: SIGTERM with 40 long-polls and 10 event streams open, a webhook receiver
that never answers and a prediction running, and ``serve`` exits within its documented
bound (docs/deploy.md, "Stopping"); nothing it accepted is lost, and after a restart
every prediction ends.
"""

from __future__ import annotations

import base64
import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SAMPLE_IMAGE
from tests.test_serve import ServerProcess, start_server

# docs/deploy.md: SIGTERM -> open requests get up to 5 s to finish, then are cut; the
# worker finishes its running prediction (here 4 steps of 0.5 s); webhook sends in flight
# are cut and retried after their claim's lease by whichever process sweeps next.
SHUTDOWN_BOUND_SECONDS = 20.0
LONG_POLLS = 40
STREAMS = 10


class HeldReceiver:
    """A webhook receiver that reads each request and never answers it."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.arrived.set()
                receiver.release.wait(120)  # the server's send is in flight all this time

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def held_receiver() -> Iterator[HeldReceiver]:
    receiver = HeldReceiver()
    yield receiver
    receiver.close()


def _long_poll(server: ServerProcess, prediction_id: str, answers: list[object]) -> None:
    try:
        response = httpx.get(
            f"{server.url}/v1/prediction/{prediction_id}",
            params={"wait": 60},
            headers={"X-API-Key": server.key},
            timeout=90,
        )
        answers.append(response.status_code)
    except httpx.HTTPError as exc:  # cut by the shutdown: what a client then retries
        answers.append(type(exc).__name__)


def _stream(server: ServerProcess, prediction_id: str, ends: list[object]) -> None:
    try:
        with httpx.stream(
            "GET",
            f"{server.url}/v1/prediction/{prediction_id}/stream",
            headers={"X-API-Key": server.key},
            timeout=90,
        ) as response:
            for _line in response.iter_lines():
                pass
        ends.append(response.status_code)
    except httpx.HTTPError as exc:
        ends.append(type(exc).__name__)


def test_sigterm_with_long_polls_and_a_webhook_in_flight_exits_within_the_bound(
    tmp_path: Path, model_cache_dir: Path, held_receiver: HeldReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUXREDUX_FAKE_STEP_SECONDS", "0.5")
    monkeypatch.setenv("FLUXREDUX_ALLOW_PRIVATE_URLS", "true")
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    server = start_server(data_dir, model_cache_dir, log, model="fake")
    stopped = False
    try:
        with server.client() as http:
            hooked = http.post(
                "/v1/prediction/",
                json={"input": {"redux_image": _image()}, "webhook_url": held_receiver.url},
            ).json()["predictionID"]
            assert held_receiver.arrived.wait(60), log.read_text()  # its webhook is being sent
            assert server.prediction(hooked)["status"] == "success"
            ids = [server.create() for _ in range(4)]
        server.wait_until_processing(ids[0])
        answers: list[object] = []
        polls = [
            threading.Thread(target=_long_poll, args=(server, ids[i % len(ids)], answers), daemon=True)
            for i in range(LONG_POLLS)
        ]
        streamed: list[object] = []
        streams = [
            threading.Thread(target=_stream, args=(server, ids[-1 - i % 2], streamed), daemon=True)
            for i in range(STREAMS)
        ]
        for poll in [*polls, *streams]:
            poll.start()
        _until(
            lambda: _open_connections(server.process.pid) >= LONG_POLLS + STREAMS,
            "the long-polls and streams are open",
        )

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(SHUTDOWN_BOUND_SECONDS + 30)
        took = time.monotonic() - started
        stopped = True
        print(f"serve stopped {took:.1f} s after SIGTERM")  # shown with -s
        assert took < SHUTDOWN_BOUND_SECONDS, f"serve took {took:.1f} s to stop\n{log.read_text()}"
        assert code == 0, log.read_text()
        for poll in polls:
            poll.join(30)
        assert len(answers) == LONG_POLLS  # every long-poll got an answer or a cut connection
        for stream in streams:
            stream.join(30)
        assert len(streamed) == STREAMS  # every stream ended (its job's end, or cut)

        # Nothing accepted is lost: after a restart, every prediction ends.
        server = start_server(data_dir, model_cache_dir, log, key=server.key, model="fake")
        stopped = False
        for prediction_id in ids:
            assert server.prediction(prediction_id, wait=60)["status"] == "success"
    finally:
        if not stopped and server.process.poll() is None:
            server.process.send_signal(signal.SIGINT)
            server.process.wait(30)


def _image() -> str:
    return "data:image/jpeg;base64," + base64.b64encode(SAMPLE_IMAGE.read_bytes()).decode()


def _open_connections(pid: int) -> int:
    """Established TCP connections of the process (its sockets in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    established = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                established += 1
    return established


def _until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
