"""The folder tree keeps showing the architecture: imports go one way only.

A room is a top-level module or a package (``api/eachlabs`` is a room of its own); an
arrow is an import from one room into another, a package and its own sub-packages aside
(``api`` assembles ``api/eachlabs``, which uses ``api``'s dependencies). Read from the
source with ``ast``, so the check needs no import and sees imports inside functions too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fluxredux"
MAX_ROOMS = 24
MAX_FLOORS = 6


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def room_of(module: str) -> str:
    path = MODULES[module]
    inside = module.split(".")[1:]
    if not inside:
        return "__init__"
    if path.name == "__init__.py":
        return "/".join(inside)
    return inside[0] if len(inside) == 1 else "/".join(inside[:-1])


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def arrows() -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(module, node):
                target = _known(name)
                if target is None:
                    continue
                a, b = room_of(module), room_of(target)
                if a != b and not (a.startswith(b + "/") or b.startswith(a + "/")):
                    out[a].add(b)
    return out


ROOMS = sorted({room_of(m) for m in MODULES})
ARROWS = arrows()


def _cycle_from(start: str) -> list[str] | None:
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(room: str) -> list[str] | None:
        path.append(room)
        on_path.add(room)
        for nxt in sorted(ARROWS[room]):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (found := visit(nxt)):
                return found
        on_path.discard(path.pop())
        done.add(room)
        return None

    return visit(start)


@cache
def floor(room: str) -> int:
    """1 for a room that imports no other, else one above the highest room it imports."""
    return 1 + max((floor(other) for other in ARROWS[room]), default=0)


def test_imports_make_no_circle() -> None:
    for room in ROOMS:
        assert _cycle_from(room) is None, " -> ".join(_cycle_from(room) or [])


def test_the_tree_stays_small_and_shallow() -> None:
    assert len(ROOMS) <= MAX_ROOMS, ROOMS
    floors = {room: floor(room) for room in ROOMS}
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda item: -item[1])


def test_the_model_package_imports_neither_the_worker_nor_the_api() -> None:
    assert not {r for r in ARROWS["pipeline"] if r.split("/")[0] in ("worker", "api", "cli")}


def test_seams_are_protocols_and_engines_live_under_backends() -> None:
    # The domain rooms never reach for an engine: backends/ picks one, once.
    for domain in ("jobs", "access", "schema", "config"):
        assert not {r for r in ARROWS[domain] if r.startswith("backends")}, domain
    top_level = {path.stem for path in PACKAGE.glob("*.py")}
    assert not {name for name in top_level if name.startswith(("redis", "sqlite", "memory", "s3"))}


def test_the_check_sees_a_circle_when_there_is_one() -> None:
    """The checks above would pass on an empty graph: show they read real arrows."""
    assert "backends" in ARROWS["api"] and "jobs" in ARROWS["backends"]
    assert floor("cli") > floor("api") > floor("backends") > floor("jobs") > floor("errors") == 1
    ARROWS["jobs"].add("api")  # as if jobs/ imported the HTTP layer
    try:
        assert _cycle_from("api") is not None
    finally:
        ARROWS["jobs"].discard("api")
