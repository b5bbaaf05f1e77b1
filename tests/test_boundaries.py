"""The light parts stay light: what the HTTP process, the client and the CLI's start-up
import must not pull in torch or diffusers (DESIGN section 4, boundary 1). The running
server process is checked too, in test_serve.py."""

from __future__ import annotations

import subprocess
import sys

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
