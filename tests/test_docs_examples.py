"""The README's and docs' examples run verbatim, so they cannot rot: every ```bash / ```sh
and ```python block is run, as a reader would paste it, against a live server
(``fluxredux serve --model fake`` in a subprocess) with ``FLUXREDUX_SERVER`` and
``FLUXREDUX_API_KEY`` set as the README tells the reader to set them, from a directory
holding ``examples/sample.jpg`` and the project's ``.venv``. A block that is not meant to
run says why on the line before its fence (``<!-- not run: why -->``, see
tests/markdown_examples.py)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, SAMPLE_IMAGE
from tests.markdown_examples import Block, blocks_in, run_block, stray_markers
from tests.test_faults import Server, serve

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [block for path in DOCS for block in blocks_in(path)]
RUNNABLE = [block for block in BLOCKS if block.runs]
# Each example gets this long; the slowest, `fluxredux predict`, runs the demo model on a CPU.
TIMEOUT_SECONDS = 240
IMAGE_SUFFIXES = {".webp", ".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class Outcome:
    """What an example left behind besides its exit status."""

    stdout: str
    images: list[Path]  # image files it wrote (the shipped examples/ excluded), decoded fine


def success_shown(outcome: Outcome) -> None:
    """The prediction's status, success: in a JSON answer, or printed first on a line."""
    assert re.search(r'"status":\s*"success"|^success\b', outcome.stdout, re.MULTILINE), outcome.stdout


def files_linked(outcome: Outcome) -> None:
    assert "/files/" in outcome.stdout, outcome.stdout


def success_with_links(outcome: Outcome) -> None:
    success_shown(outcome)
    files_linked(outcome)


def images_written(count: int, suffix: str) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        assert len(outcome.images) == count, outcome.images
        assert all(path.suffix == suffix for path in outcome.images), outcome.images

    return check


# What the examples must achieve, beyond exiting 0, found by a phrase of theirs. Each phrase
# must match a runnable example (test_every_outcome_check_applies), so a check cannot quietly
# stop applying when an example is rewritten.
OUTCOMES: dict[str, Callable[[Outcome], None]] = {
    "?wait=60": success_shown,  # curl: create, then the long-poll's answer
    "client.download(url)": images_written(2, ".webp"),  # the Python client
    "fluxredux run examples/sample.jpg": images_written(2, ".webp"),
    "fluxredux predict examples/sample.jpg": images_written(2, ".png"),
    "api.eachlabs.ai": success_with_links,  # requests, as code written for Eachlabs does
    "replicate.Client(": files_linked,
}


def test_the_docs_have_runnable_examples() -> None:
    """A parser that found nothing would make every example 'pass': count what is run."""
    readme = [block for block in RUNNABLE if block.path.name == "README.md"]
    assert len(readme) >= 7, [block.name for block in readme]
    assert {block.runner for block in readme} == {"shell", "python"}
    # What those examples rely on is told to the reader, once, in a block of its own.
    setup = "".join(block.code for block in BLOCKS if block.path.name == "README.md")
    assert "export FLUXREDUX_SERVER=" in setup and "export FLUXREDUX_API_KEY=" in setup


def test_every_not_run_marker_marks_a_block_and_says_why() -> None:
    assert {path.name: stray_markers(path) for path in DOCS} == {path.name: [] for path in DOCS}
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.runner is not None, f"{block.name}: only runnable blocks need a not-run marker"


def test_every_outcome_check_applies() -> None:
    for phrase in OUTCOMES:
        assert any(phrase in block.code for block in RUNNABLE), f"no runnable example contains {phrase!r}"


def test_examples_use_images_that_exist() -> None:
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "photo.jpg" not in text and "example.com/photo" not in text, path.name
        for mentioned in re.findall(r"examples/[\w./-]*\w", text):
            assert (REPO / mentioned).is_file(), f"{path.name} mentions {mentioned}, which does not exist"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("docs-serve"), model="fake") as server:
        yield server


@pytest.fixture
def example_env(live: Server, model_cache_dir: Path) -> dict[str, str]:
    """The reader's environment after the README's two exports, and nothing of ours:
    no FLUXREDUX_ setting of the machine running the tests leaks in."""
    venv_bin = str(Path(sys.executable).parent)
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXREDUX_")}
    return {
        **env,
        "FLUXREDUX_SERVER": live.url,
        "FLUXREDUX_API_KEY": live.key,
        # `fluxredux predict` without a GPU: the demo model, already written once per session.
        "CUDA_VISIBLE_DEVICES": "",
        "FLUXREDUX_CACHE_DIR": str(model_cache_dir),
        # python3 (which the shell examples use to read JSON) is then the venv's.
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "COLUMNS": "200",
    }


def reader_dir(tmp_path: Path) -> Path:
    """A directory like the repository root as the examples see it: examples/sample.jpg
    and .venv (a link to this interpreter's venv), and nothing an example could depend on
    by accident."""
    (tmp_path / "examples").mkdir()
    shutil.copy(SAMPLE_IMAGE, tmp_path / "examples" / SAMPLE_IMAGE.name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    return tmp_path


def images_under(directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if relative.parts[0] in ("examples", ".venv") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        with Image.open(path) as image:
            image.verify()  # a real image, not an error page saved under an image's name
        found.append(path)
    return found


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs(block: Block, live: Server, example_env: dict[str, str], tmp_path: Path) -> None:
    cwd = reader_dir(tmp_path)
    result = run_block(block, cwd, example_env, TIMEOUT_SECONDS)
    assert result.returncode == 0, (
        f"{block.name} ({block.runner}) failed with exit status {result.returncode}:\n{block.code}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}\n"
        f"--- server log\n{live.log.read_text(errors='replace')[-2000:]}"
    )
    outcome = Outcome(result.stdout, images_under(cwd))
    for phrase, check in OUTCOMES.items():
        if phrase in block.code:
            check(outcome)


def test_a_failing_example_fails(tmp_path: Path) -> None:
    """The runner is strict: a failing command, an unset variable or a failing stage of a
    pipe fails a shell example; an exception fails a Python one."""
    env = dict(os.environ)
    env.pop("NOT_SET_ANYWHERE", None)
    failing = [
        ("bash", "false\necho not reached\n"),
        ("sh", 'echo "$NOT_SET_ANYWHERE"\n'),
        ("bash", "false | cat\n"),
        ("python", "raise SystemExit('refused')\n"),
    ]
    for language, code in failing:
        block = Block(tmp_path / "x.md", 1, language, code, None)
        result = run_block(block, tmp_path, env, 30)
        assert result.returncode != 0, (language, code, result.stdout)
        assert "not reached" not in result.stdout
    passing = run_block(Block(tmp_path / "x.md", 1, "bash", "echo ok\n", None), tmp_path, env, 30)
    assert (passing.returncode, passing.stdout) == (0, "ok\n")


def test_the_parser_honours_the_convention(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n"
        "```bash\necho one\n```\n"
        "<!-- not run: starts a server for good -->\n"
        "```bash\nserve forever\n```\n"
        "```text\nsome output\n```\n"
        "- a list item:\n"
        "  ```python\n  print('indented')\n  ```\n"
        "````sh\n```\nnested fence\n````\n",
        encoding="utf-8",
    )
    blocks = blocks_in(page)
    assert [(b.line, b.language, b.code, b.not_run, b.runs) for b in blocks] == [
        (2, "bash", "echo one\n", None, True),
        (6, "bash", "serve forever\n", "starts a server for good", False),
        (9, "text", "some output\n", None, False),
        (13, "python", "print('indented')\n", None, True),
        (16, "sh", "```\nnested fence\n", None, True),
    ]
    assert stray_markers(page) == []
    page.write_text(
        "<!-- not run: nothing follows -->\n\n```bash\necho\n```\n<!-- not run: -->\n```sh\nx\n```\n"
    )
    assert stray_markers(page) == [1, 6]
