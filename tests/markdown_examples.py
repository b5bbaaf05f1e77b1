"""The fenced code blocks of a Markdown file, and how one of them is run as a reader would.

A ```bash / ```sh block is a shell example and a ```python block a Python one; any other
fence (output, config files, ```text) is never run. A runnable block that is not meant to
run (it starts a server for good, needs a GPU, Redis or the network) says so on the line
right before its fence, visibly in the source:

    <!-- not run: why -->
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The fence languages that are examples to run, and what runs them.
RUNNERS = {"bash": "shell", "sh": "shell", "python": "python"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based, as an editor shows it
    language: str  # the fence's info string ("" for a bare fence)
    code: str
    not_run: str | None  # the reason given by a <!-- not run: ... --> line, if any

    @property
    def runner(self) -> str | None:
        """ "shell" or "python" for an example, None for any other fence."""
        return RUNNERS.get(self.language)

    @property
    def runs(self) -> bool:
        return self.runner is not None and self.not_run is None

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks_in(path: Path) -> list[Block]:
    """Every fenced block of ``path``, indented ones (in a list item) included, with the
    indentation of its fence taken off its lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not _closes(lines[end], fence):
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        marker = NOT_RUN.match(lines[index - 1]) if index > 0 else None
        reason = marker["reason"].strip() if marker else None
        blocks.append(Block(path, index + 1, opening["info"].lower(), "\n".join(body) + "\n", reason))
        index = end + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0])


def stray_markers(path: Path) -> list[int]:
    """Lines of ``<!-- not run -->`` markers that stand before no fence (so they mark
    nothing), or that give no reason."""
    lines = path.read_text(encoding="utf-8").splitlines()
    stray = []
    for number, line in enumerate(lines, start=1):
        marker = NOT_RUN.match(line)
        if marker is None:
            continue
        followed_by_fence = number < len(lines) and _FENCE.match(lines[number]) is not None
        if not followed_by_fence or not marker["reason"].strip():
            stray.append(number)
    return stray


def run_block(
    block: Block, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``block`` in ``cwd`` as a reader pasting it would, but strictly: a shell block
    with ``bash -euo pipefail`` (any failing command, unset variable or broken pipe
    fails it), a Python block with this interpreter (the project's venv). The code is
    written to a file first, so a traceback or bash's error names its line."""
    if block.runner is None:
        raise ValueError(f"{block.name}: a ```{block.language} block is not an example to run")
    script = cwd / (".example.sh" if block.runner == "shell" else ".example.py")
    script.write_text(block.code, encoding="utf-8")
    command = (
        ["bash", "-euo", "pipefail", str(script)]
        if block.runner == "shell"
        else [sys.executable, str(script)]
    )
    return subprocess.run(
        command,
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
