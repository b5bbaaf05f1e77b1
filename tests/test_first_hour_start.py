"""The first hour, starting up: what a new user meets before the first prediction, as real
processes. The version; the fake model explained in --help; a port already in use; the
start-up log naming the playground; a Python without the model's packages (a plain line
saying what to install, or the fake model, which needs none); and a worker that can never
start, which the server stops restarting and names in /health, /ready and its 503s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import fluxredux
from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.errors import ModelUnavailable, NoWorker
from tests.conftest import SAMPLE_IMAGE
from tests.helpers import FLUXREDUX
from tests.services import free_port
from tests.test_faults import serve, supervisor_for
from tests.uninstalled import MODEL_PACKAGES, broken_torch, without


def fluxredux_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([FLUXREDUX, *args], capture_output=True, text=True, env=environment, timeout=120)


def processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds ``marker`` (a worker child has its
    server's settings there, the data dir among them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


# --- the command itself -------------------------------------------------------------------


def test_version_prints_the_version() -> None:
    result = fluxredux_command("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fluxredux {fluxredux.__version__}"


@pytest.mark.parametrize("command", ["serve", "worker", "predict"])
def test_help_explains_the_fake_model(command: str) -> None:
    result = fluxredux_command(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # help is wrapped to the width
    assert "fake: no model and no weights, flat colours at once, for trying the API and for tests" in text


# --- a port in use --------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_naming_it_and_nothing_is_left_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        result = fluxredux_command(
            "serve", "--port", str(port), "--data-dir", str(data_dir), "--model", "fake"
        )
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert f"port {port} is in use" in line and "--port" in line, line
    assert "Traceback" not in result.stderr + result.stdout
    assert processes_with(f"FLUXREDUX_DATA_DIR={data_dir}") == []  # no worker child was left behind


# --- the start-up log -----------------------------------------------------------------------


def test_the_start_log_names_the_playground_and_the_api_docs(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        text = server.text()
        assert f"playground: {server.url}/," in text, text
        assert f"API docs: {server.url}/docs" in text, text
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert httpx.get(server.url + "/docs").status_code == 200


# --- without the model's packages -----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--model", "demo"],
        ["serve"],  # auto: the demo model here (no GPU), which needs torch too
        ["worker", "--redis", "redis://127.0.0.1:1/0", "--model", "flux"],
        ["predict", str(SAMPLE_IMAGE), "--model", "demo"],
    ],
    ids=["serve-demo", "serve-auto", "worker", "predict"],
)
def test_a_model_without_its_packages_is_one_line_saying_what_to_install(
    tmp_path: Path, args: list[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data")] if args[0] != "predict" else ["-o", str(tmp_path / "out")]
    if args[0] == "serve":
        data += ["--port", str(free_port())]
    result = fluxredux_command(*args, *data, env=without(tmp_path, *MODEL_PACKAGES))
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "pip install torch first" in line and "then pip install 'fluxredux[model]'" in line, line
    assert line.index("pip install torch") < line.index("fluxredux[model]")
    assert not (tmp_path / "out").exists()


def test_the_fake_model_needs_no_torch(tmp_path: Path) -> None:
    with serve(tmp_path, model="fake", env=without(tmp_path, *MODEL_PACKAGES)) as server:
        assert server.get(server.create_id(), wait=30)["status"] == "success"


# --- a worker that can never start ----------------------------------------------------------


def test_a_worker_whose_model_cannot_be_imported_is_not_restarted_and_says_why(tmp_path: Path) -> None:
    """torch is there but does not import (a broken install): the worker exits at start, the
    server does not start it again (every restart would fail the same way), /health and
    /ready say why, and creates are refused with 503 naming it, without a Retry-After (no
    retry can succeed before someone fixes it)."""
    data_dir = tmp_path / "data"
    with serve(tmp_path, model="demo", env=broken_torch(tmp_path), wait_ready=False) as server:
        server.wait_for(lambda: server.health()["model"].get("cannot_start"), 60, "the server never gave up")
        reason = server.health()["model"]["cannot_start"]
        assert "cannot import torch" in reason and "libtorch_cpu.so" in reason, reason
        assert "pip install torch first" in reason and "fluxredux[model]" in reason, reason
        ready = server.ready()
        assert ready.status_code == 503 and reason in ready.json()["error"], ready.json()
        response = server.create()
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "model_unavailable" and reason in response.json()["error"]
        assert "Retry-After" not in response.headers
        # Past the first restart's backoff (1 s), with room: still no worker process again.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert processes_with(f"FLUXREDUX_DATA_DIR={data_dir}") == []
            time.sleep(0.1)
        health = server.health()
        assert health["model"]["restarts"] == 0 and not health["model"]["alive"]
        assert server.text().count("the worker process exited") == 1
        assert "Traceback" not in server.text()
        assert server.process.poll() is None  # the server itself lives on, and says why


def test_the_supervisor_stops_only_for_a_worker_that_cannot_start(tmp_path: Path) -> None:
    """Exit code 3 (the model cannot be imported or loaded) ends the restarts, with the
    worker's own reason; any other exit at start (a crash) is restarted as before."""
    (tmp_path / "cannot").mkdir()
    (tmp_path / "crash").mkdir()
    cannot_start = (
        "import os, sys\n"
        "from fluxredux.backends.sqlite.registry import SQLiteWorkerRegistry\n"
        "from fluxredux.jobs.registry import WorkerInfo\n"
        "registry = SQLiteWorkerRegistry(sys.argv[1])\n"
        "details = {'error': {'error': 'no weights here: run fluxredux download', 'code': 'x'}}\n"
        "me = os.environ['FLUXREDUX_WORKER_ID']\n"
        "registry.register(WorkerInfo(me, 'h', os.getpid(), 'm', 'cpu', 'failed', 0.0, details=details))\n"
        "raise SystemExit(3)\n"
    )
    database = tmp_path / "cannot" / "jobs.db"
    stopped = supervisor_for(
        tmp_path / "cannot", SQLiteJobStore(database), [sys.executable, "-c", cannot_start, str(database)]
    )
    crashing = supervisor_for(
        tmp_path / "crash",
        SQLiteJobStore(tmp_path / "crash" / "jobs.db"),
        [sys.executable, "-c", "raise SystemExit(1)"],
    )
    stopped.start()
    crashing.start()
    try:
        deadline = time.monotonic() + 30
        while stopped.state.cannot_start is None or crashing.state.exits_before_ready < 3:
            assert time.monotonic() < deadline, (stopped.state, crashing.state)
            time.sleep(0.05)
        assert stopped.state.cannot_start == "no weights here: run fluxredux download"
        assert stopped.state.restarts == 0
        [problem] = stopped.problems()
        assert "no weights here" in problem and "restart the server" in problem, problem
        refusal = stopped.refusal()
        assert isinstance(refusal, ModelUnavailable) and "no weights here" in refusal.message
        assert "retry_after" not in refusal.detail
        assert isinstance(crashing.refusal(), NoWorker)  # a crash loop: retried, and said to be
    finally:
        stopped.stop()
        crashing.stop()
