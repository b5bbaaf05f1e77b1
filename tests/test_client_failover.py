"""The Python client when its server goes away: real `fluxredux serve` processes, one
killed (SIGKILL) under an open long-poll and another started on the same port and data
dir (embedded SQLite: the interrupted job is recovered and run again)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.api.eachlabs.shapes import Prediction
from fluxredux.client import AsyncFluxRedux, ConnectionLost, FluxRedux
from fluxredux.client.core import Exchange, download_call, get_call, upload_call
from tests.helpers import FLUXREDUX, png_data_uri
from tests.services import free_port


@dataclass
class Server:
    """`fluxredux serve --model fake` on one port and data dir, started again at will."""

    data_dir: Path
    log: Path
    # 0 until the first start binds a free port itself (a port picked here and bound later
    # can be taken meanwhile by another test's server: it once answered this one's polls);
    # restarts reuse it, as a restarted server would.
    port: int = 0
    key: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "FLUXREDUX_CACHE_DIR": str(self.data_dir.parent / "cache"),
            "FLUXREDUX_FAKE_STEP_SECONDS": "0.5",  # four steps: a 2 s run
            "CUDA_VISIBLE_DEVICES": "",
        }
        command = [FLUXREDUX, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*command, "--model", "fake"], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            try:
                if not self.port:
                    self.port = self._bound_port()
                elif httpx.get(self.url + "/health", timeout=1).json()["model"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        if not self.key:
            match = re.search(r"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", self.log.read_text())
            assert match, self.log.read_text()
            self.key = match.group(1)

    def _bound_port(self) -> int:
        """The port the server says it serves on, once it has said so (0 before)."""
        served = re.findall(r"serving on http://127\.0\.0\.1:(\d+)", self.log.read_text())
        return int(served[-1]) if served else 0

    def kill(self) -> None:
        """kill -9: no shutdown code runs; its open connections just drop."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def status(self, prediction_id: str) -> str:
        response = httpx.get(
            f"{self.url}/v1/prediction/{prediction_id}", headers={"X-API-Key": self.key}, timeout=10
        )
        return str(response.raise_for_status().json()["status"])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "data", tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sent_gets(log: list[httpx.Request]) -> dict[str, Any]:
    """httpx options that record each request as it is sent (before it connects)."""

    def record(request: httpx.Request) -> None:
        log.append(request)

    async def record_async(request: httpx.Request) -> None:
        log.append(request)

    return {"event_hooks": {"request": [record]}, "async_hooks": {"request": [record_async]}}


def wait_sync(server: Server, prediction_id: str, sent: list[httpx.Request]) -> Prediction:
    hooks = sent_gets(sent)
    with FluxRedux(server.url, server.key, event_hooks=hooks["event_hooks"]) as client:
        return client.wait(prediction_id, timeout=120)


def wait_async(server: Server, prediction_id: str, sent: list[httpx.Request]) -> Prediction:
    async def go() -> Prediction:
        hooks = sent_gets(sent)
        async with AsyncFluxRedux(server.url, server.key, event_hooks=hooks["async_hooks"]) as client:
            return await client.wait(prediction_id, timeout=120)

    return asyncio.run(go())


@pytest.mark.parametrize("waiter", [wait_sync, wait_async], ids=["sync", "async"])
def test_wait_rides_out_a_server_killed_under_its_long_poll(
    server: Server, waiter: Callable[[Server, str, list[httpx.Request]], Prediction]
) -> None:
    with FluxRedux(server.url, server.key) as client:
        prediction_id = client.create({"redux_image": png_data_uri(), "num_inference_steps": 4})
    deadline = time.monotonic() + 30
    while server.status(prediction_id) != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.02)

    sent: list[httpx.Request] = []
    outcome: list[Prediction | BaseException] = []

    def run() -> None:
        try:
            outcome.append(waiter(server, prediction_id, sent))
        except BaseException as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=run, daemon=True)
    waiting.start()
    deadline = time.monotonic() + 10
    while not sent:  # the long-poll is on its way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # ... and held by the server (a 2 s run: not over yet)
    assert server.status(prediction_id) == "processing" and not outcome
    server.kill()
    server.start()  # same port, same data dir: the job is recovered and run again
    waiting.join(60)
    assert not waiting.is_alive(), "wait did not return within 60 s of the restart"

    assert len(outcome) == 1
    done = outcome[0]
    assert isinstance(done, Prediction), repr(done)  # not the RemoteProtocolError of the killed node
    assert done.id == prediction_id and done.status == "success", done
    assert "recovered 1 prediction(s) interrupted by the last shutdown" in server.log.read_text()
    polls = [r for r in sent if r.url.path == f"/v1/prediction/{prediction_id}"]
    assert len(polls) >= 2 and all(r.url.params.get("wait") for r in polls)  # long-polls, re-sent


# --- a server that stays down: the resends are bounded in time, and only reads (and keyed
# creates) are re-sent at all.


@pytest.fixture
def nowhere() -> str:
    """An address nothing listens on: each connect is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def test_a_read_gives_up_when_the_server_stays_down(nowhere: str) -> None:
    sent: list[httpx.Request] = []
    with FluxRedux(nowhere, "fr_key", max_retry_wait=2, event_hooks=sent_gets(sent)["event_hooks"]) as c:
        started = time.monotonic()
        with pytest.raises(ConnectionLost) as info:
            c.get("some-id")
        took = time.monotonic() - started
    # At once, then after 0.5 s and 1 s, then the 0.5 s left of the 2 s: five tries on a quiet
    # machine (a slow try can use up the last wait: four), then no more. The schedule itself,
    # on a clock of the test's own, below.
    assert 1.9 <= took < 10
    assert len(sent) in (4, 5) and {r.url.path for r in sent} == {"/v1/prediction/some-id"}
    error = info.value
    assert isinstance(error, httpx.TransportError) and isinstance(error.__cause__, httpx.ConnectError)
    assert error.code == "connection_lost" and error.detail["tries"] == len(sent)
    said = re.match(
        rf"GET {nowhere}/v1/prediction/some-id: no answer in (\d) tries over (\d+\.\d) s", str(error)
    )
    assert said is not None and int(said[1]) == len(sent) and float(said[2]) >= 1.9, str(error)
    assert error.request.url.path == "/v1/prediction/some-id"

    sent.clear()
    with (
        FluxRedux(nowhere, "fr_key", retries=0, event_hooks=sent_gets(sent)["event_hooks"]) as c,
        pytest.raises(httpx.ConnectError),  # retries=0: not re-sent at all
    ):
        c.list()
    assert len(sent) == 1


def test_wait_gives_up_at_its_timeout_when_the_server_stays_down(nowhere: str) -> None:
    with FluxRedux(nowhere, "fr_key") as client:  # max_retry_wait: 60 s
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            client.wait("some-id", timeout=1.5)
        assert 1.4 <= time.monotonic() - started < 3.5

    async def go() -> None:
        async with AsyncFluxRedux(nowhere, "fr_key") as client:
            with pytest.raises(ConnectionLost):
                await client.wait("some-id", timeout=1.5)
        async with AsyncFluxRedux(nowhere, "fr_key", max_retry_wait=0.5) as client:
            with pytest.raises(ConnectionLost):
                await client.download(nowhere + "/files/x")

    started = time.monotonic()
    asyncio.run(go())
    assert 1.8 <= time.monotonic() - started < 5.0


def test_a_create_without_a_key_is_never_re_sent(nowhere: str) -> None:
    sent: list[httpx.Request] = []
    hooks = sent_gets(sent)["event_hooks"]
    with FluxRedux(nowhere, "fr_key", max_retry_wait=1, event_hooks=hooks) as client:
        with pytest.raises(httpx.ConnectError) as info:
            client.create({"redux_image": png_data_uri()})
        assert not isinstance(info.value, ConnectionLost) and len(sent) == 1
        sent.clear()
        with pytest.raises(ConnectionLost):  # with a key, a resend can only find the first one's
            client.create({"redux_image": png_data_uri()}, idempotency_key="k")
        assert len(sent) >= 3 and {r.method for r in sent} == {"POST"}


# --- the policy itself (core.Exchange, no I/O), on a clock that moves only with its pauses


def test_the_pauses_after_losses_back_off_until_the_retry_time_is_spent() -> None:
    now = [0.0]
    exchange = Exchange(get_call("x", 55), retries=3, max_wait=30, clock=lambda: now[0])
    pauses: list[float] = []
    lost = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    with pytest.raises(ConnectionLost) as info:
        while (pause := exchange.after(lost)) is not None:
            pauses.append(pause)
            now[0] += pause + 0.01  # each try fails 10 ms after it is sent
    # Many more than ``retries``: time bounds them. The last pause ends just when the 30 s do.
    assert pauses == pytest.approx([0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 2.41])
    assert info.value.__cause__ is lost and info.value.detail == {"tries": 11, "seconds": 30.0}

    # A try that takes long to fail spends the same time: fewer tries, not a longer wait.
    now[0] = 0.0
    slow = Exchange(download_call("/files/x"), retries=3, max_wait=30, clock=lambda: now[0])
    with pytest.raises(ConnectionLost):
        while (pause := slow.after(httpx.ConnectTimeout("timed out"))) is not None:
            now[0] += pause + 10.0
    assert now[0] <= 40.0


@pytest.mark.parametrize(
    "loss",
    [httpx.UnsupportedProtocol("no scheme"), httpx.PoolTimeout("pool full"), httpx.ProxyError("refused")],
    ids=lambda loss: type(loss).__name__,
)
def test_losses_a_resend_would_meet_again_are_raised_at_once(loss: httpx.TransportError) -> None:
    with pytest.raises(type(loss)) as info:
        Exchange(get_call("x", 0), retries=3, max_wait=60).after(loss)
    assert info.value is loss


def test_an_upload_is_not_re_sent_after_a_loss() -> None:
    loss = httpx.ReadError("reset")
    with pytest.raises(httpx.ReadError):
        Exchange(upload_call(b"data"), retries=3, max_wait=60).after(loss)
