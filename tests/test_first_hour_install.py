"""The first hour, installing: the README's two commands, ./scripts/run and ./scripts/test,
run for real on a copy of the repository whose tools are stand-ins that write down how they
were called (pip inside .venv, apt-get, sudo): what each command installs, and what it says
before it touches the system.

- scripts/run installs the server and the model (extras server, model), never the test
  tools; scripts/test installs those too. A run after a test installs nothing; a test after
  a run installs the dev tools; a changed pyproject.toml is installed again.
- torch goes in first (pinned), before anything that would pull a CUDA build.
- scripts/test says which Debian packages it installs and why before it installs them, with
  --no-install-recommends, and puts only missing packages on apt-get's command line (an
  installed one named there would be upgraded).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

LOGGER = '#!/bin/sh\necho "{name} $*" >> "$CALLS"\n'
# .venv's python: pip calls succeed; `-c "import torch"` fails unless FAKE_TORCH is set.
FAKE_PYTHON = (
    '#!/bin/sh\necho "python $*" >> "$CALLS"\nif [ "$1" = "-c" ]; then [ -n "$FAKE_TORCH" ]; exit; fi\n'
)
# The real tools the scripts use; nothing else of the machine's is on their PATH.
TOOLS = ("bash", "sh", "cat", "cut", "dirname", "grep", "sha256sum")


@dataclass
class Checkout:
    root: Path
    calls: Path
    bin: Path

    def run(self, *command: str, torch: bool = True, root: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(self.bin), "CALLS": str(self.calls), "FAKE_UID": "0" if root else "1000"}
        if torch:
            env["FAKE_TORCH"] = "1"
        self.calls.write_text("")
        return subprocess.run(
            [str(self.root / command[0]), *command[1:]],
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream: what was said before what ran
            text=True,
            timeout=60,
        )

    def called(self) -> list[str]:
        return self.calls.read_text().splitlines()

    def pip_installs(self) -> list[str]:
        return [call for call in self.called() if call.startswith("python -m pip install")]

    def have(self, *commands: str) -> None:
        """Commands the machine has (an installed Debian package's, say)."""
        for name in commands:
            tool(self.bin / name, LOGGER.format(name=name))


def tool(path: Path, script: str) -> None:
    path.write_text(script)
    path.chmod(0o755)


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    root = tmp_path / "fluxredux"
    (root / "scripts").mkdir(parents=True)
    for script in ("setup", "run", "test"):
        shutil.copy2(REPO / "scripts" / script, root / "scripts" / script)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    venv = root / ".venv" / "bin"
    venv.mkdir(parents=True)  # as if created already: `python -m venv` is not what is tested
    tool(venv / "python", FAKE_PYTHON)
    for name in ("fluxredux", "ruff", "mypy", "pytest"):
        tool(venv / name, LOGGER.format(name=name))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in TOOLS:
        found = shutil.which(name)
        assert found is not None, name
        os.symlink(found, bin_dir / name)
    tool(bin_dir / "id", '#!/bin/sh\necho "$FAKE_UID"\n')
    tool(bin_dir / "sudo", '#!/bin/sh\necho "sudo $*" >> "$CALLS"\nexec "$@"\n')
    tool(bin_dir / "apt-get", '#!/bin/sh\necho "apt-get $*" >> "$CALLS"\necho "APT-GET-RAN $*" >&2\n')
    return Checkout(root, tmp_path / "calls.log", bin_dir)


def test_run_installs_the_server_and_the_model_but_no_test_tools(checkout: Checkout) -> None:
    result = checkout.run("scripts/run", "--port", "9000")
    assert result.returncode == 0, result.stdout
    assert checkout.pip_installs()[-1] == "python -m pip install -q -e .[server,model]"
    assert checkout.called()[-1] == "fluxredux serve --port 9000"


def test_torch_goes_in_first_and_pinned(checkout: Checkout) -> None:
    result = checkout.run("scripts/run", torch=False)
    assert result.returncode == 0, result.stdout
    installs = [call for call in checkout.pip_installs() if "--upgrade pip" not in call]
    assert installs == [
        "python -m pip install -q torch==2.13.0",
        "python -m pip install -q -e .[server,model]",
    ]


def test_each_purpose_installs_once_and_a_test_install_covers_a_run(checkout: Checkout) -> None:
    def installed_by(*command: str) -> list[str]:
        result = checkout.run(*command)
        assert result.returncode == 0, result.stdout
        return [call.rsplit(" ", 1)[-1] for call in checkout.pip_installs() if " -e " in call]

    checkout.have("chromium", "redis-server")
    assert installed_by("scripts/setup", "run") == [".[server,model]"]
    assert installed_by("scripts/setup", "run") == []
    assert installed_by("scripts/test") == [".[server,model,dev]"]  # the dev tools, after a run
    assert installed_by("scripts/run") == []  # a run after a test: nothing
    assert installed_by("scripts/test") == []
    with (checkout.root / "pyproject.toml").open("a") as pyproject:
        pyproject.write("# changed\n")
    assert installed_by("scripts/run") == [".[server,model]"]
    assert installed_by("scripts/test") == [".[server,model,dev]"]


def test_the_tests_system_packages_are_named_and_why_before_they_are_installed(checkout: Checkout) -> None:
    result = checkout.run("scripts/test", root=False)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "chromium: the browser tests drive it with Playwright" in out
    assert "redis-server: the scale-out tests start their own Redis servers" in out
    assert out.index("chromium: the browser tests") < out.index("APT-GET-RAN install")  # said first
    [install] = [call for call in checkout.called() if call.startswith("apt-get install")]
    assert "--no-install-recommends" in install.split() and "--no-upgrade" in install.split()
    assert install.split()[-2:] == ["chromium", "redis-server"]
    assert "sudo apt-get install" in " ".join(checkout.called())  # not root: through sudo


def test_only_missing_packages_are_installed_and_nothing_when_all_are_there(checkout: Checkout) -> None:
    checkout.have("redis-server")  # installed: naming it to apt-get would upgrade it
    result = checkout.run("scripts/test")
    assert result.returncode == 0, result.stdout
    [install] = [call for call in checkout.called() if call.startswith("apt-get install")]
    assert install.split()[-1] == "chromium" and "redis-server" not in install
    assert "redis-server:" not in result.stdout
    checkout.have("chromium")
    result = checkout.run("scripts/test")
    assert result.returncode == 0, result.stdout
    assert not [call for call in checkout.called() if call.startswith("apt-get")]
    assert checkout.called()[-1].startswith("pytest -n")  # and on to the tests
