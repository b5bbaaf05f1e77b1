"""The light parts stay light: what the HTTP process, the client and the CLI's start-up
import must not pull in torch or diffusers (DESIGN section 4, boundary 1). The running
server process is checked too, in test_serve.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.conftest import REPO, SAMPLE_IMAGE
from tests.helpers import FLUXREDUX
from tests.test_faults import serve
from tests.uninstalled import SERVER_PACKAGES, without

LIGHT_MODULES = [
    "fluxredux.schema",
    "fluxredux.config",
    "fluxredux.errors",
    "fluxredux.images",
    "fluxredux.safety",
    "fluxredux.pipeline.weights",
    "fluxredux.worker.predictor",
    "fluxredux.pipeline.fake",
    "fluxredux.cli",
    "fluxredux.cli.app",
    "fluxredux.cli.serve",
    "fluxredux.cli.worker",
    "fluxredux.cli.predict",
    "fluxredux.pipeline.requirements",
    "fluxredux.worker.logs",
    "fluxredux.worker.process",
    "fluxredux.api.app",
    "fluxredux.api.server",
    "fluxredux.client",
    "fluxredux.jobs",
    "fluxredux.jobs.events",
    "fluxredux.jobs.limits",
    "fluxredux.jobs.registry",
    "fluxredux.storage",
    "fluxredux.api.maintenance",
    "fluxredux.worker.supervisor",
    "fluxredux.worker.factories",
    "fluxredux.worker.loop",
    "fluxredux.worker.child",
]


def test_light_modules_import_no_torch() -> None:
    code = (
        "import sys\n"
        f"for name in {LIGHT_MODULES!r}: __import__(name)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the client, for people who only call a server (`pip install 'fluxredux[client]'`) ----

# What the server extra brings and the client must never load. (rich is not among them:
# httpx imports it for its own command line when it happens to be installed; the test
# below shows the client works without it.)
NOT_FOR_THE_CLIENT = (
    "fastapi", "starlette", "uvicorn", "pydantic_settings", "PIL", "numpy", "typer", "redis",
    "boto3", "botocore", "platformdirs", "huggingface_hub", "prometheus_client", "torch",
)  # fmt: skip


def test_the_client_imports_none_of_the_servers_packages() -> None:
    code = (
        "import sys\n"
        "from fluxredux.client import FluxRedux, AsyncFluxRedux\n"
        f"print(sorted(m for m in {NOT_FOR_THE_CLIENT!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_pip_installing_the_client_brings_httpx_and_pydantic_only() -> None:
    """Extras only add to the base dependencies: the base is the client's, and the server's
    packages are an extra of their own, which the model's and the tests' extras include."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert names(project["dependencies"]) == names(extras["client"]) == ["httpx", "pydantic"]
    assert {"fastapi", "uvicorn", "typer", "pillow", "redis", "boto3"} <= set(names(extras["server"]))
    assert "fluxredux[server]" in extras["model"] and "diffusers" in names(extras["model"])
    assert "torch" not in names(extras["model"])  # installed first, the build for the hardware
    assert "fluxredux[server,model]" in extras["dev"]


def names(requirements: list[str]) -> list[str]:
    return sorted(
        re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements
    )


def test_the_client_works_with_only_httpx_and_pydantic(tmp_path: Path) -> None:
    """Against a real server, from a Python that cannot import any of the server's packages
    (as one with only the client extra installed): upload, create, wait, download."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fluxredux.client import FluxRedux\n"
        "with FluxRedux(sys.argv[1], api_key=sys.argv[2]) as client:\n"
        "    prediction = client.run({'redux_image': Path(sys.argv[3]), 'megapixels': '0.25'})\n"
        "    print(prediction.status, len(client.download(prediction.output)) > 0)\n"
    )
    with serve(tmp_path, model="fake") as server:
        result = subprocess.run(
            [sys.executable, "-c", script, server.url, server.key, str(SAMPLE_IMAGE)],
            env=without(tmp_path, *SERVER_PACKAGES),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["success", "True"]


def test_the_command_with_only_the_client_says_what_to_install(tmp_path: Path) -> None:
    for args in ([], ["serve"], ["--version"]):
        result = subprocess.run(
            [FLUXREDUX, *args], env=without(tmp_path, *SERVER_PACKAGES), capture_output=True, text=True
        )
        assert result.returncode == 2, result
        [line] = result.stderr.strip().splitlines()  # one line, no trace
        assert line.startswith("error: ") and line.endswith("pip install 'fluxredux[server]'"), line
