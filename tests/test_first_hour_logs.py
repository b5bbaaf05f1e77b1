"""The first hour, reading the log: `fluxredux serve` with its output in a file (as under
systemd or docker), where every record is one line, never wrapped, in one style for the
server and its worker; ``--log-format json`` (or FLUXREDUX_LOG_FORMAT), one JSON object
per line from both; rich's handler on a terminal; and the demo model's notice said once
per start, not per job or per worker restart. Real processes, their logs read back."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import wait_for
from tests.helpers import FLUXREDUX
from tests.services import free_port
from tests.test_faults import Server, serve

# time, level, which process, message: the one prefix of every record off a terminal.
RECORD = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) (server|worker): "
)
# The first key is not a record: it is set apart for a person to copy (text format only).
KEY_BANNER = ("No API key existed, so one was created", "fr_")


def stopped(server: Server) -> str:
    """The whole log, once the server has stopped (its worker's last lines included)."""
    server.process.send_signal(signal.SIGINT)
    server.process.wait(30)
    return server.text()


def test_off_a_terminal_every_record_is_one_unwrapped_line_in_one_style(tmp_path: Path) -> None:
    # COLUMNS=80: what a console library would wrap to, were it asked.
    with serve(tmp_path, env={"COLUMNS": "80"}) as server:
        assert server.get(server.create_id(), wait=30)["status"] == "success"
        text = stopped(server)
    lines = [line for line in text.splitlines() if line.strip()]
    records = [line for line in lines if not line.lstrip().startswith(KEY_BANNER)]
    assert len(lines) - len(records) == 2, text  # the banner and the key, nothing else
    assert all(RECORD.match(line) for line in records), "\n".join(r for r in records if not RECORD.match(r))
    assert {RECORD.match(line).group(2) for line in records} == {"server", "worker"}  # type: ignore[union-attr]
    [serving] = [line for line in records if "serving on" in line]
    assert len(serving) > 80 and serving.endswith(f"API docs: {server.url}/docs)"), serving
    assert any(re.search(r"worker: prediction \S+: succeeded in", line) for line in records), text


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_json_logs_are_one_object_per_line_from_the_server_and_its_worker(tmp_path: Path, how: str) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    args = [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model", "fake"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if how == "flag":
        args += ["--log-format", "json"]
    else:
        env["FLUXREDUX_LOG_FORMAT"] = "json"
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: '"worker' in log.read_text() and "ready" in log.read_text(), 60, log.read_text)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message", "process"} <= record.keys() for record in records)
    assert {record["process"] for record in records} == {"server", "worker"}
    messages = " ".join(record["message"] for record in records)
    assert "serving on" in messages and "ready" in messages
    assert re.search(r"fr_[0-9a-f]{12}_", messages)  # even the first key is a record


def test_a_scale_out_worker_logs_json_too(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    log = tmp_path / "worker.log"
    env = {**os.environ, "FLUXREDUX_REDIS_PREFIX": redis_prefix, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(
        [FLUXREDUX, "worker", "--redis", redis_url, "--model", "fake", "--log-format", "json",
         "--data-dir", str(tmp_path / "data"), "--storage", f"file://{tmp_path / 'files'}"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: " ready: " in log.read_text(), 60, log.read_text)
    finally:
        process.terminate()
        process.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert {record["process"] for record in records} == {"worker"}
    assert any(record["level"] == "WARNING" and "fake model" in record["message"] for record in records)


def test_on_a_terminal_the_log_is_richs(tmp_path: Path) -> None:
    leader, follower = os.openpty()
    port = free_port()
    process = subprocess.Popen(
        [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model", "fake"],
        stdout=follower,
        stderr=follower,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200", "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"worker: " not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace"))  # colours off
    assert re.search(r"INFO\s+fluxredux serving on", text), text  # rich's level column
    assert not re.search(r"Z INFO (server|worker): ", text), text  # not the plain lines


def test_the_demo_models_notice_is_logged_once_per_start(tmp_path: Path, model_cache_dir: Path) -> None:
    """Not per prediction, nor when the worker process is restarted (killed here)."""
    notice = "demo model: random weights, outputs are noise"
    with serve(tmp_path, model="demo", env={"FLUXREDUX_CACHE_DIR": str(model_cache_dir)}) as server:
        os.kill(server.health()["model"]["pid"], signal.SIGKILL)
        server.wait_for(lambda: server.health()["model"]["restarts"] == 1, 30, "no restart")
        server.wait_for(lambda: server.health()["model"]["ready"], 60, "the new worker never got ready")
        result = server.get(server.create_id(megapixels="0.25"), wait=60)
        assert result["status"] == "success" and notice in result["logs"]  # the prediction says it
        text = stopped(server)
    assert text.count(notice) == 1, text
    # The server's own lines say which model is ready once: the restart is a line of its own.
    assert len([line for line in text.splitlines() if "server: model ready: DEMO model" in line]) == 1, text
    assert "server: the worker process is ready again" in text, text
