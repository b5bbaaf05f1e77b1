"""The speed settings where they cannot run: a clear error naming the way out, at worker
start (never a traceback, never on the first request), or a clear 4xx for the one
request a setting cannot serve."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from fluxredux.errors import ModelUnavailable
from fluxredux.pipeline.quantization import check_quantization
from tests.conftest import SAMPLE_IMAGE
from tests.harness import free_port
from tests.helpers import FLUXREDUX, png_data_uri
from tests.test_cli import run_cli

PREDICT = ("predict", str(SAMPLE_IMAGE), "--megapixels", "0.25", "-o", "out")


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error")]
    return line


def test_fp8_is_refused_without_a_cuda_gpu() -> None:
    with pytest.raises(ModelUnavailable, match=r"compute capability 8\.9 or newer .* runs on cpu"):
        check_quantization("fp8", torch.device("cpu"))
    check_quantization("none", torch.device("cpu"))  # nothing to check


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--quantize", "fp8"), "quantize=fp8 needs a CUDA GPU of compute capability 8.9"),
        (
            ("--attention-backend", "warp-drive"),
            "unknown attention backend 'warp-drive'; choose one of: auto",
        ),
        # A backend whose package is not installed (diffusers' own words follow).
        (("--attention-backend", "xformers"), "attention backend 'xformers' is not available"),
        # torch's flash kernel runs on this CPU, but takes no bias, which the collapse needs.
        (("--attention-backend", "_native_flash"), "does not take an attention bias"),
        (("--compile", "everything"), "--compile"),
    ],
    ids=["fp8-on-cpu", "unknown-backend", "missing-package", "no-bias-backend", "unknown-compile"],
)
def test_a_setting_that_cannot_run_is_one_plain_error(
    tmp_path: Path, model_cache_dir: Path, flags: tuple[str, ...], expected: str
) -> None:
    if "xformers" in flags and importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    result = run_cli(*PREDICT, *flags, cache=model_cache_dir, cwd=tmp_path)
    if flags[0] == "--compile":  # typer refuses the value itself, naming the choices
        assert result.returncode == 2 and "none" in result.stderr and "transformer" in result.stderr
        return
    assert expected in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_combinations_offloading_cannot_run_are_refused_before_loading() -> None:
    from fluxredux.pipeline.speed import Tuning, check_tuning

    with pytest.raises(
        ModelUnavailable, match="compile=transformer cannot be combined with offload=sequential"
    ):
        check_tuning(Tuning(compile="transformer"), torch.device("cuda"), "sequential")
    check_tuning(Tuning(compile="transformer"), torch.device("cpu"), "none")


def test_auto_is_torch_sdpa_whatever_another_model_chose() -> None:
    """diffusers keeps a process-wide default backend, which choosing one for a model
    changes: "auto" must not inherit it."""
    from fluxredux.pipeline.architecture import TINY, build_random_components
    from fluxredux.pipeline.attention import choose_attention

    cpu = torch.device("cpu")
    first, second = (build_random_components(TINY).transformer for _ in range(2))
    assert not choose_attention(first, "_native_flash", device=cpu, dtype=torch.float32).takes_bias
    assert choose_attention(second, "auto", device=cpu, dtype=torch.float32).takes_bias


def test_a_backend_without_bias_runs_uncollapsed_but_refuses_a_weaker_reference(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    flags = ("--attention-backend", "_native_flash", "--no-collapse-zero-tokens")
    plain = run_cli(*PREDICT, *flags, cache=model_cache_dir, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "sequence: 528 text + 1024 image tokens" in plain.stderr
    weaker = run_cli(*PREDICT, *flags, "--redux-strength", "0.5", cache=model_cache_dir, cwd=tmp_path)
    line = one_line_error(weaker)
    assert "(invalid_input)" in line and "redux_strength" in line and "_native_flash" in line


def test_serve_with_a_setting_its_worker_cannot_run_says_why_and_refuses_work(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    """The worker refuses to start; /health says why, and a create is a 503 naming it
    rather than a job queued for a worker that will never come."""
    port = free_port()
    env = {**os.environ, "FLUXREDUX_CACHE_DIR": str(model_cache_dir), "CUDA_VISIBLE_DEVICES": ""}
    log = (tmp_path / "serve.log").open("w")
    command = [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    server = subprocess.Popen(
        [*command, "--model", "demo", "--quantize", "fp8"], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                if "compute capability" in str(health):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        key = next(word for word in (tmp_path / "serve.log").read_text().split() if word.startswith("fr_"))
        response = httpx.post(
            url + "/v1/prediction/",
            json={"model": "flux-redux-schnell", "input": {"redux_image": png_data_uri()}},
            headers={"X-API-Key": key},
        )
        assert response.status_code == 503, response.text
        assert "quantize=fp8 needs a CUDA GPU" in response.text
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        server.terminate()
        server.wait(15)
