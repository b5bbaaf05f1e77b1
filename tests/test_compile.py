"""torch.compile on the demo model (CPU, inductor): compiled at load, never per request.

The warm-up compiles the few graphs a request can take (one output or several, with an
attention bias or without); then 20 requests of mixed sizes, batches, strengths and a
prompt compile nothing more, and give what the eager model gives. A restart finds the
compiled code on disk; a compiler that fails leaves a worker that runs eager and says so.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fluxredux.pipeline.compilation import compiled_graphs
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.pipeline.speed import Tuning
from fluxredux.schema import MEGAPIXELS, TABLE_ASPECT_RATIOS, PredictionInput
from fluxredux.worker.predictor import PredictionResult, Predictor
from tests.conftest import SAMPLE_IMAGE
from tests.helpers import png_data_uri
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compile-data")


# Compiling takes minutes on a 2-core CPU, and the module's fixture compiles.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def compiled(model_cache_dir: Path, data_dir: Path) -> Iterator[ReduxModel]:
    """The demo model compiled as a worker compiles it (everything that compiles: the
    transformer and the image encoder), with its cache under ``data_dir``."""
    from fluxredux.pipeline.demo import demo_model_paths

    paths = demo_model_paths(model_cache_dir)
    tuning = Tuning(compile="all", compile_cache=data_dir / "compile-cache")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        yield ReduxModel.load(
            str(paths.schnell), str(paths.redux), kind="demo", device=torch.device("cpu"), tuning=tuning
        )
    finally:  # the worker's setting, not this test process's: later tests' subprocesses inherit it
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def predict(model: ReduxModel, image: Image.Image, **fields: Any) -> PredictionResult:
    inputs = PredictionInput(
        redux_image=png_data_uri(), disable_safety_checker=True, output_format="png", **fields
    )
    return Predictor(model, safety=None).predict(inputs, [image])


def pixels(result: PredictionResult) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(o.data)), dtype=np.int16) for o in result.outputs])


def test_the_warm_up_compiles_every_graph_and_says_so(compiled: ReduxModel, data_dir: Path) -> None:
    # The transformer: one output or several x with a bias (the collapsed token) or without
    # (a prompt); and the image encoder.
    assert "compile all (5 graphs in " in compiled.info.describe()
    assert any((data_dir / "compile-cache").rglob("*")), "nothing was kept on disk"


def test_twenty_mixed_requests_compile_nothing_and_match_eager(
    compiled: ReduxModel, demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    rng = np.random.default_rng(5)
    requests: list[dict[str, Any]] = [
        {
            "aspect_ratio": str(rng.choice(TABLE_ASPECT_RATIOS)),
            "megapixels": str(rng.choice(MEGAPIXELS)),
            "num_outputs": int(rng.integers(1, 5)),
            "num_inference_steps": 1,
            "redux_strength": float(rng.choice([1.0, 1.0, 0.5])),
            "seed": i,
        }
        for i in range(18)
    ]
    requests += [  # a prompt: its own sequence length, without a bias and with one
        {"megapixels": "0.25", "prompt": "a red fox", "seed": 1, "num_inference_steps": 1},
        {"megapixels": "0.25", "prompt": "a red fox", "redux_strength": 0.5, "num_outputs": 3, "seed": 2},
    ]
    assert len({(r.get("aspect_ratio"), r["megapixels"], r.get("num_outputs")) for r in requests}) > 10
    before = compiled_graphs()
    results = [predict(compiled, reference_image, **fields) for fields in requests]
    assert compiled_graphs() == before, "a request compiled a graph the warm-up did not"

    for fields, result in list(zip(requests, results, strict=True))[::4]:
        eager = predict(demo_model, reference_image, **fields)
        difference = np.abs(pixels(result) - pixels(eager))
        assert difference.max() <= 2, f"{fields}: max difference {difference.max()}/255"


def test_a_restarted_worker_finds_the_compiled_code_on_disk(model_cache_dir: Path, tmp_path: Path) -> None:
    """Two worker processes one after the other, as a restart is: the second finds what the
    first compiled. (Both CLI processes, not this test process first: what this process
    imported before, torchao's inductor passes for one, is part of inductor's cache key.)"""
    args = ("predict", str(SAMPLE_IMAGE), "--megapixels", "0.25", "--compile", "transformer", "-o", "out")
    data = tmp_path / "data"
    first = run_cli(*args, cache=model_cache_dir, cwd=tmp_path, FLUXREDUX_DATA_DIR=str(data))
    assert first.returncode == 0, first.stderr
    again = run_cli(*args, cache=model_cache_dir, cwd=tmp_path, FLUXREDUX_DATA_DIR=str(data))
    assert again.returncode == 0, again.stderr
    assert "from the disk cache" in again.stderr, again.stderr
