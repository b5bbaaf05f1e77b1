"""Python environments with packages taken away, for real processes: what a user has who
installed fewer extras (the client alone; the server without the model).

``without(tmp_path, "torch", "diffusers")`` is an environment (for ``subprocess``) whose
Python cannot import those packages, in any process it starts (the server's workers too):
a ``sitecustomize`` on ``PYTHONPATH`` puts a finder first on ``sys.meta_path`` that refuses
them as an uninstalled package is refused (ModuleNotFoundError; ``find_spec`` raises it
too). ``broken_torch(tmp_path)`` is one whose ``torch`` is found but fails to import, as a
broken install does.
"""

from __future__ import annotations

import os
from pathlib import Path

# Everything the server extra brings, by import name: what the client must do without.
SERVER_PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic_settings",
    "PIL",
    "numpy",
    "typer",
    "click",
    "rich",
    "pygments",
    "redis",
    "boto3",
    "botocore",
    "prometheus_client",
    "multipart",
    "python_multipart",
    "standardwebhooks",
    "fastapi_offline",
    "platformdirs",
    "huggingface_hub",
    "nudenet",
)
MODEL_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors")

SITECUSTOMIZE = """
import os
import sys

_REFUSED = set(os.environ["FLUXREDUX_TEST_UNINSTALLED"].split(","))


class _Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Uninstalled())
"""


def _with_path(folder: Path, env: dict[str, str] | None) -> dict[str, str]:
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), base.get("PYTHONPATH", "")) if p)
    return base


def without(tmp_path: Path, *packages: str, env: dict[str, str] | None = None) -> dict[str, str]:
    folder = tmp_path / "uninstalled"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**_with_path(folder, env), "FLUXREDUX_TEST_UNINSTALLED": ",".join(packages)}


def broken_torch(tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    folder = tmp_path / "broken-torch"
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    (folder / "torch" / "__init__.py").write_text(
        'raise ImportError("libtorch_cpu.so: cannot open shared object file (broken, for the test)")\n'
    )
    return _with_path(folder, env)
