"""The command line's first hour: `run`'s references, server URL, file names and progress;
the input flags' --help; `workers` at 80 columns. Real processes, real servers."""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console

from fluxredux.api.eachlabs.shapes import Prediction
from fluxredux.cli.download import output_indices
from fluxredux.cli.run import RunProgress, state_of
from fluxredux.client import AsyncFluxRedux, FluxRedux, ServerUrlError
from fluxredux.jobs.registry import WorkerInfo
from fluxredux.pipeline.fake import FakeModel
from tests.conftest import SAMPLE_IMAGE
from tests.harness import Harness, running_server
from tests.helpers import FLUXREDUX
from tests.test_cli import run_cli

ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")
CLOCK = re.compile(r"\b(\d+):(\d\d):(\d\d)\b")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.05)) as harness:
        yield harness


def predictions_made(api: Harness) -> int:
    return len(api.services.store.list_by_owner(api.services.keys.list()[0].id, 10))


def in_a_terminal(
    args: list[str], *, cwd: Path, columns: int, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run ``args`` with a terminal ``columns`` wide as stdin, stdout and stderr (as a user
    at a shell does); its exit code and everything it showed, without the escape codes."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    environment = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm", **(env or {})}
    process = subprocess.Popen(
        args, stdin=terminal, stdout=terminal, stderr=terminal, cwd=cwd, env=environment
    )
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"still running after {timeout} s:\n{shown.decode()}"
            ready, _, _ = select.select([controller], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not chunk:
                break
            shown += chunk
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return code, ANSI.sub("", shown.decode(errors="replace")).replace("\r\n", "\n")


# --- 1. a reference is told apart by its shape: a missing file is no upload id


def test_run_says_a_missing_file_is_missing_and_sends_nothing(api: Harness, tmp_path: Path) -> None:
    result = run_cli(
        "run", "nothere.jpg", "--server", api.url, "--key", api.key, cache=tmp_path, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "no such file: nothere.jpg" in result.stderr and "Traceback" not in result.stderr
    mix = '[{"image": "https://example.com/a.png"}, {"image": "missing.png", "weight": 2}]'
    result = run_cli(
        "run", "--redux-images", mix, "--server", api.url, "--key", api.key, cache=tmp_path, cwd=tmp_path
    )
    assert result.returncode == 2 and "no such file: missing.png" in result.stderr, result.stderr
    assert predictions_made(api) == 0


def test_run_sends_an_upload_id_as_an_id_and_a_file_so_named_as_a_file(api: Harness, tmp_path: Path) -> None:
    named_like_an_id = "AbCdEfGhIjKlMnOpQrStUv"  # 22 url-safe characters, as an upload id
    common = ("--server", api.url, "--key", api.key, "-o", "out")
    # No such file: it is an id, sent as one; this server never had it.
    result = run_cli("run", named_like_an_id, *common, cache=tmp_path, cwd=tmp_path)
    assert result.returncode != 0 and "no uploaded file with id" in result.stderr, result.stderr
    # A file of that name: the file is what is meant, uploaded.
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / named_like_an_id, "PNG")
    result = run_cli("run", named_like_an_id, *common, cache=tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [job] = api.services.store.list_by_owner(api.services.keys.list()[0].id, 5)
    assert api.services.uploads.uploaded(job.input_files) == set(job.input_files)


# --- 2. the server's URL as people paste it


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/v1/prediction/", "/docs"])
def test_run_takes_a_server_url_with_an_api_path_and_says_what_it_used(
    api: Harness, tmp_path: Path, suffix: str
) -> None:
    pasted = api.url + suffix
    result = run_cli(
        "run",
        str(SAMPLE_IMAGE),
        "--server",
        pasted,
        "--key",
        api.key,
        "-o",
        "out",
        cache=tmp_path,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert f"using the server's base URL {api.url}, not {pasted}" in note
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_run_takes_a_trailing_slash_silently_and_refuses_a_url_without_scheme(
    api: Harness, tmp_path: Path
) -> None:
    common = ("--key", api.key, "-o", "out")
    result = run_cli(
        "run", str(SAMPLE_IMAGE), "--server", api.url + "/", *common, cache=tmp_path, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr
    bare = api.url.removeprefix("http://")
    result = run_cli("run", str(SAMPLE_IMAGE), "--server", bare, *common, cache=tmp_path, cwd=tmp_path)
    assert result.returncode == 2
    assert f"pass the server's base URL, e.g. {api.url}" in result.stderr and "Traceback" not in result.stderr


def test_both_clients_correct_an_api_path_in_the_server_url(
    api: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fluxredux.client"):
        with FluxRedux(api.url + "/v1", api.key) as client:
            assert client.base_url == api.url
            assert client.run({"redux_image": SAMPLE_IMAGE}).status == "success"

        async def go() -> str:
            async with AsyncFluxRedux(api.url + "/v1/prediction", api.key) as client:
                return (await client.run({"redux_image": SAMPLE_IMAGE})).status

        assert asyncio.run(go()) == "success"
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("fluxredux.client")]
    assert len(warned) == 2 and all(f"using the server's base URL {api.url}" in m for m in warned), warned
    with FluxRedux(api.url + "/", api.key) as client:  # a trailing slash is no mistake
        assert client.base_url == api.url
    assert len([r for r in caplog.records if r.name.startswith("fluxredux.client")]) == 2
    # The address bar of the docs page, its fragment and all.
    with FluxRedux(api.url + "/docs#/default/create_v1_prediction__post", api.key) as client:
        assert client.base_url == api.url and client.list(limit=1).items
    with pytest.raises(ServerUrlError, match="has a query or a fragment"):
        FluxRedux(api.url + "/?key=abc", api.key)
    with pytest.raises(
        ServerUrlError, match=re.escape("pass the server's base URL, e.g. http://127.0.0.1:8000")
    ):
        FluxRedux("127.0.0.1:8000/v1", api.key)


# --- 3. --help says which flags take numbers, and their choices


@pytest.mark.parametrize("command", ["run", "predict"])
def test_help_shows_numbers_as_numbers_and_short_choices(command: str) -> None:
    shown = subprocess.run(
        [FLUXREDUX, command, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    ).stdout
    flags = dict(re.findall(r"^\s+(--[a-z-]+) (<[^>]+>)", shown, re.MULTILINE))
    assert flags["--num-outputs"] == "<int>"
    assert flags["--num-inference-steps"] == "<int>"
    assert flags["--seed"] == "<int>"
    assert flags["--output-quality"] == "<int>"
    assert flags["--redux-strength"] == "<float>"
    assert flags["--megapixels"] == "<1|0.25>"
    assert flags["--output-format"] == "<webp|jpg|png>"
    assert flags["--redux-images"] == "<json>"
    assert "--disable-safety-checker " in shown and "--disable-safety-checker <" not in shown
    assert re.search(r"Number of images to generate\.\s+Range 1-4\.\s+Default: 1\.", shown)


# --- 4. `fluxredux workers` at 80 columns: one line each


def register_workers(data_dir: Path) -> list[WorkerInfo]:
    """Two workers of other hosts (so no pid of theirs is checked here), one with a model
    description as long as the real model's; (re)registered now, so live for the TTL."""
    from fluxredux.api.services import build_services
    from fluxredux.config import Settings
    from tests.harness import ThreadWorkers

    long_model = "FLUX.1 Redux [schnell] on cuda (bfloat16, offload none; compile transformer (12 graphs))"
    elsewhere = {"process_space": "elsewhere"}
    entries = [
        WorkerInfo(
            "3f2a9c1b7d4e-1a2b3c4d", "3f2a9c1b7d4e", 1234567, long_model, "cuda:0", "ready",
            time.time() - 7200, details=elsewhere,
        ),
        WorkerInfo(
            "gpu-2-deadbeef", "gpu-2", 42, "flux", "auto", "loading", time.time() - 30, details=elsewhere
        ),
    ]  # fmt: skip
    services = build_services(Settings(data_dir=data_dir, model="fake"), lambda *_: ThreadWorkers())
    try:
        for entry in entries:
            services.registry.register(entry)
    finally:
        services.close()
    return entries


def test_workers_fit_an_80_column_terminal_one_line_each(tmp_path: Path) -> None:
    entries = register_workers(tmp_path / "data")
    code, shown = in_a_terminal(
        [FLUXREDUX, "workers", "--data-dir", str(tmp_path / "data")], cwd=tmp_path, columns=80
    )
    assert code == 0, shown
    lines = [line for line in shown.splitlines() if line.strip()]
    assert len(lines) == 3, shown  # the header, then one line per worker
    assert all(len(line.rstrip()) <= 80 for line in lines), shown
    for entry, line in zip(entries, lines[1:], strict=True):
        assert line.startswith(entry.id + " ") and f" {entry.pid} " in line and entry.state in line, shown
        assert re.search(r"\d\.\d s ago", line) and re.search(r"\d+ (s|min|h|d) ago", line), shown
    assert "FLUX…" in lines[1] or "FLUX.1…" in lines[1], shown  # the long one cut short, visibly
    # Wide enough, the model shows whole, its "[schnell]" read as text, not as markup.
    register_workers(tmp_path / "data")  # heard from again: well inside their time to live
    code, shown = in_a_terminal(
        [FLUXREDUX, "workers", "--data-dir", str(tmp_path / "data")], cwd=tmp_path, columns=200
    )
    assert code == 0 and entries[0].model in shown, shown


def test_workers_piped_are_tab_separated_whole_fields(tmp_path: Path) -> None:
    entries = register_workers(tmp_path / "data")
    listed = subprocess.run(
        [FLUXREDUX, "workers", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert listed.returncode == 0, listed.stderr
    header, *rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert header == ["worker", "host", "pid", "state", "model", "device", "heartbeat", "started"]
    assert [row[:6] for row in rows] == [
        [e.id, e.host, str(e.pid), e.state, e.model, e.device] for e in entries
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", row[7]) for row in rows), rows


# --- 5. `run` names its files as `predict` does


def test_run_names_files_as_predict_does(api: Harness, tmp_path: Path, model_cache_dir: Path) -> None:
    args = (str(SAMPLE_IMAGE), "--seed", "7", "--num-outputs", "2", "--megapixels", "0.25")
    ran = run_cli(
        "run", *args, "--server", api.url, "--key", api.key, "-o", "ran", cache=tmp_path, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    predicted = run_cli(
        "predict", *args, "--model", "fake", "-o", "predicted", cache=model_cache_dir, cwd=tmp_path
    )
    assert predicted.returncode == 0, predicted.stderr
    names = ["sample-7-0.webp", "sample-7-1.webp"]
    assert sorted(p.name for p in (tmp_path / "ran").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "predicted").iterdir()) == names
    assert f"{Path('ran') / names[0]}  " in ran.stdout


def test_an_image_the_safety_checker_removed_leaves_a_gap_in_the_names() -> None:
    # As predict numbers its outputs: by their place in the generated batch.
    assert output_indices([{"unsafe": False}, {"unsafe": True}, {"unsafe": False}], 2) == [0, 2]
    assert output_indices([], 3) == [0, 1, 2]  # the checker was off


# --- 6. progress: what happens after the last step, and one clock from start to end


def prediction(status: str, step: int, phase: str | None = None, **more: Any) -> Prediction:
    return Prediction.model_validate(
        {
            "id": "p1", "model": "flux-redux-schnell", "version": "0.0.1", "status": status, "input": {},
            "metrics": {}, "progress": {"step": step, "total": 4, "phase": phase},
            "created_at": "2025-01-01T00:00:00Z", "urls": {"get": "g", "cancel": "c"}, **more,
        }
    )  # fmt: skip


def test_the_bar_says_what_happens_after_the_last_step() -> None:
    assert state_of(prediction("starting", 0, queue_position=2)) == "queued, 2 ahead"
    assert state_of(prediction("processing", 2)) == "step 2 of 4"
    assert state_of(prediction("processing", 4)) == "step 4 of 4"  # a server that reports no phase
    for phase in ("decoding", "safety check", "encoding", "storing"):
        assert state_of(prediction("processing", 4, phase)) == phase
    assert state_of(prediction("success", 4)) == "success"  # the API's own word for it
    shown = io.StringIO()
    console = Console(file=shown, force_terminal=True, width=100, color_system=None)
    with RunProgress(time.monotonic() - 65, uploads=False, console=console) as progress:
        progress.show(prediction("processing", 4, "encoding"))
        progress.show(prediction("success", 4))
        progress.downloading(0, 2)
        progress.downloading(1, 2)
    frames = ANSI.sub("", shown.getvalue())
    assert "encoding 0:01:05" in frames and "downloading 2 of 2 0:01:05" in frames, frames


def test_run_shows_each_phase_and_one_clock_until_the_prediction_ends(tmp_path: Path) -> None:
    from tests.test_faults import serve

    # Four short steps, then 3 s of "safety check and encoding": a clock that stopped at the
    # last step would say 0:00:01 at most.
    slow_after_the_steps = {"FLUXREDUX_FAKE_STEP_SECONDS": "0.2", "FLUXREDUX_FAKE_CPU_SECONDS": "3"}
    with serve(tmp_path, env=slow_after_the_steps) as server:
        args = [FLUXREDUX, "run", str(SAMPLE_IMAGE), "--server", server.url, "--key", server.key, "-o", "out"]
        started = time.monotonic()
        code, shown = in_a_terminal(args, cwd=tmp_path, columns=120, env={"CUDA_VISIBLE_DEVICES": ""})
        took = time.monotonic() - started
    assert code == 0, shown
    frames = shown.replace("\r", "\n")
    hours, minutes, seconds = map(int, CLOCK.findall(frames)[-1])  # as the bar was left
    clock = hours * 3600 + minutes * 60 + seconds
    assert 3 <= clock <= took, (clock, took, frames)
    assert "uploading" in frames and re.search(r"step \d of 4", frames), frames
    assert "downloading" in frames and "success, downloaded" in frames, frames
