"""torch.compile that fails (no C++ compiler, as on a machine without one): the worker
runs eager and says so. Apart from tests/test_compile.py so that the suite's parallel
workers run it beside that module's minutes of compiling, not after them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SAMPLE_IMAGE
from tests.test_cli import run_cli

# It compiles (and fails) in a subprocess: minutes on a 2-core CPU.
pytestmark = pytest.mark.timeout(900)


def test_a_compiler_that_fails_leaves_an_eager_worker_that_says_so(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    args = ("predict", str(SAMPLE_IMAGE), "--megapixels", "0.25", "--compile", "transformer", "-o", "out")
    result = run_cli(
        *args,
        cache=model_cache_dir,
        cwd=tmp_path,
        CXX="/nonexistent/g++",  # inductor's C++ compiler: as on a machine without one
        FLUXREDUX_DATA_DIR=str(tmp_path / "data"),  # an empty compile cache: it must compile
    )
    assert result.returncode == 0, result.stderr
    assert "torch.compile failed, running eager instead" in result.stderr
    assert "compile transformer FAILED, running eager" in " ".join(result.stderr.split())
    assert len(list((tmp_path / "out").iterdir())) == 1
    assert "Traceback" not in result.stderr
