"""`fluxredux serve` as a user runs it: a real server process with its worker process,
the demo model (random weights: outputs are noise), and what happens when things die."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import SAMPLE_IMAGE
from tests.harness import free_port
from tests.helpers import FLUXREDUX, TERMINAL


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    key: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=30)

    def health(self) -> dict:
        return dict(httpx.get(self.url + "/health", timeout=5).json())

    def create(self, **inputs: object) -> str:
        image = "data:image/jpeg;base64," + base64.b64encode(SAMPLE_IMAGE.read_bytes()).decode()
        body = {"model": "flux-redux-schnell", "input": {"redux_image": image, **inputs}}
        response = httpx.post(self.url + "/v1/prediction/", json=body, headers={"X-API-Key": self.key})
        return str(response.json()["predictionID"])

    def prediction(self, prediction_id: str, wait: float = 0) -> dict:
        response = httpx.get(
            f"{self.url}/v1/prediction/{prediction_id}",
            params={"wait": wait},
            headers={"X-API-Key": self.key},
            timeout=wait + 10,
        )
        return dict(response.json())

    def wait_until_processing(self, prediction_id: str) -> None:
        deadline = time.monotonic() + 30
        while self.prediction(prediction_id)["status"] != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.02)


def start_server(
    data_dir: Path, cache: Path, log: Path, *, key: str | None = None, model: str = "demo"
) -> ServerProcess:
    port = free_port()
    env = {**os.environ, "FLUXREDUX_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
    handle = log.open("a")
    process = subprocess.Popen(
        [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(data_dir), "--model", model],
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).json()["model"]["ready"]:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    if key is None:
        match = re.search(r"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", log.read_text())
        assert match, log.read_text()
        key = match.group(1)
    return ServerProcess(process=process, url=url, key=key, log=log)


@pytest.fixture
def server_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield tmp_path / "data", tmp_path / "server.log"


def stop(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()


def test_the_spec_pages_example_flow(server_dirs: tuple[Path, Path], model_cache_dir: Path) -> None:
    data_dir, log = server_dirs
    server = start_server(data_dir, model_cache_dir, log)
    try:
        assert "No API key existed, so one was created" in log.read_text()
        health = server.health()
        assert health["model"]["demo"] is True and "outputs are noise" in health["model"]["notice"]
        headers = {"X-API-Key": server.key, "Content-Type": "application/json"}
        image = "data:image/jpeg;base64," + base64.b64encode(SAMPLE_IMAGE.read_bytes()).decode()
        # The hosted API's own example body, verbatim but for the image.
        body = (
            '{"model": "flux-redux-schnell","version": "0.0.1","input": {"seed": null,"megapixels": "1",'
            '"num_outputs": "1","redux_image": "IMAGE","aspect_ratio": "1:1","output_format": "webp",'
            '"output_quality": "80","num_inference_steps": "4","disable_safety_checker": false}}'
        ).replace("IMAGE", image)
        prediction = httpx.post(server.url + "/v1/prediction/", headers=headers, content=body).json()
        assert prediction["status"] == "success", prediction
        prediction_id = prediction["predictionID"]
        deadline = time.monotonic() + 60
        while True:
            result = httpx.get(f"{server.url}/v1/prediction/{prediction_id}", headers=headers).json()
            if result["status"] == "success":
                break
            assert result["status"] != "error", result
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert result["output"].startswith(server.url + "/files/") and result["output"].endswith(".webp")
        assert result["metrics"]["predict_time"] > 0
        assert httpx.get(result["output"]).headers["content-type"] == "image/webp"
        assert "demo model: random weights, outputs are noise" in result["logs"]
        # The HTTP process never loaded torch (the worker process did).
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "libtorch" not in maps
        worker_maps = Path(f"/proc/{health['model']['pid']}/maps").read_text()
        assert "libtorch" in worker_maps
    finally:
        stop(server)


def test_fluxredux_run_against_a_server(
    server_dirs: tuple[Path, Path], model_cache_dir: Path, tmp_path: Path
) -> None:
    data_dir, log = server_dirs
    server = start_server(data_dir, model_cache_dir, log)
    try:
        result = subprocess.run(
            [FLUXREDUX, "run", str(SAMPLE_IMAGE), "--server", server.url, "--key", server.key,
             "--num-outputs", "2", "--megapixels", "0.25", "--seed", "3", "-o", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        files = sorted((tmp_path / "out").iterdir())
        assert len(files) == 2 and all(f.suffix == ".webp" for f in files)
        assert result.stdout.strip().endswith("seed: 3")
        assert "step 4 of 4" in result.stderr or "success" in result.stderr
    finally:
        stop(server)


def test_nothing_accepted_is_lost_when_the_server_is_killed(
    server_dirs: tuple[Path, Path], model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Supervision, not the model: the fake model, each run 2 s, so the kill lands mid-run.
    monkeypatch.setenv("FLUXREDUX_FAKE_STEP_SECONDS", "0.5")
    data_dir, log = server_dirs
    server = start_server(data_dir, model_cache_dir, log, model="fake")
    first = server.create(num_outputs=2, seed=1)
    assert server.prediction(first, wait=60)["status"] == "success"
    ids = [server.create(num_outputs=2, seed=1) for _ in range(4)]
    server.wait_until_processing(ids[0])
    server.process.kill()  # kill -9: no shutdown code runs
    server.process.wait()

    again = start_server(data_dir, model_cache_dir, log, key=server.key, model="fake")
    try:
        assert "recovered 1 prediction(s) interrupted by the last shutdown" in log.read_text()
        for prediction_id in ids:
            result = again.prediction(prediction_id, wait=60)
            assert result["status"] in TERMINAL, result
            assert result["status"] == "success" or result["error_code"] == "worker_lost"
        kept = again.prediction(first)
        assert kept["status"] == "success"
        assert all(httpx.get(url.replace(server.url, again.url)).status_code == 200 for url in kept["output"])
    finally:
        stop(again)


def test_a_crashed_worker_is_restarted_and_its_job_rerun(
    server_dirs: tuple[Path, Path], model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Supervision, not the model: the fake model, each run 2 s, so the kill lands mid-run.
    monkeypatch.setenv("FLUXREDUX_FAKE_STEP_SECONDS", "0.5")
    data_dir, log = server_dirs
    server = start_server(data_dir, model_cache_dir, log, model="fake")
    try:
        prediction_id = server.create(num_outputs=4)
        server.wait_until_processing(prediction_id)
        os.kill(server.health()["model"]["pid"], signal.SIGKILL)
        result = server.prediction(prediction_id, wait=60)
        assert result["status"] == "success", result
        assert len(result["output"]) == 4
        assert server.health()["model"]["restarts"] == 1
        assert "restarting" in log.read_text()
    finally:
        stop(server)


def test_keys_create_prints_the_key_alone_on_the_last_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [FLUXREDUX, "keys", "create", "--name", "ci", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"fr_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    listed = subprocess.run(
        [FLUXREDUX, "keys", "list", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    key_id = key.split("_")[1]
    assert f"{key_id}  active" in listed.stdout and key not in listed.stdout  # stored as a hash only
    assert key not in (tmp_path / "fluxredux.db").read_bytes().decode("latin-1")
    revoked = subprocess.run(
        [FLUXREDUX, "keys", "revoke", key_id, "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert revoked.returncode == 0
    assert (
        "revoked"
        in subprocess.run(
            [FLUXREDUX, "keys", "list", "--data-dir", str(tmp_path)], capture_output=True, text=True
        ).stdout
    )


def test_server_and_client_modules_import_no_torch() -> None:
    code = (
        "import sys, fluxredux.api.app, fluxredux.api.server, fluxredux.client, fluxredux.cli\n"
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


def test_keep_alive_responses_do_not_stall(server_dirs: tuple[Path, Path], model_cache_dir: Path) -> None:
    """Regression guard, not a speed target: a listening socket made without
    proto=IPPROTO_TCP loses TCP_NODELAY and every keep-alive response waits ~40 ms."""
    import socket as socket_module

    from fluxredux.api.server import bind
    from fluxredux.config import Settings

    sock = bind(Settings(host="127.0.0.1", port=0))
    assert sock.proto == socket_module.IPPROTO_TCP
    sock.close()

    data_dir, log = server_dirs
    server = start_server(data_dir, model_cache_dir, log, model="fake")
    try:
        with httpx.Client(base_url=server.url) as client:
            client.get("/health")
            timings = []
            for _ in range(9):
                started = time.perf_counter()
                client.get("/health")
                timings.append(time.perf_counter() - started)
        assert sorted(timings)[4] < 0.02, timings  # a stall is >= 40 ms every time
    finally:
        stop(server)
