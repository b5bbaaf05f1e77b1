"""``fluxredux workers``: who is running predictions, with which model, last seen when."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import typer
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from fluxredux.cli.app import app, out, plain_errors
from fluxredux.cli.options import DataDirOption, RedisOption, settings_from
from fluxredux.jobs.registry import WorkerInfo

COLUMNS = ("worker", "host", "pid", "state", "model", "device", "heartbeat", "started")
# The columns that give way when the terminal is narrow, cut short with an ellipsis: the
# host is in a worker's id already (see new_worker_id), and a model's description can be
# a long line (its dtype, offload, compile report). The id, the pid, the state and the
# times stay whole: they are what one reads the list for, or copies.
SHRINKING = frozenset({"host", "model", "device"})


@app.command()
def workers(data_dir: DataDirOption = None, redis: RedisOption = None) -> None:
    """List the live workers: id, host, process, state, model, device, last heartbeat, start.

    Those of the data dir's server, or with --redis those of the whole deployment. In a
    terminal, one line each (long fields cut short); piped, tab-separated fields, whole."""
    from fluxredux.backends import backends_for
    from fluxredux.jobs.registry import is_gone

    settings = settings_from(data_dir=data_dir, redis_url=redis)
    if settings.redis_url is None and not settings.database_path.exists():
        out.print(f"no workers: nothing has run with the data dir {settings.data_dir}", highlight=False)
        return
    backends = backends_for(settings)
    try:
        with plain_errors():
            registry = backends.registry
            now = registry.now()
            live = [w for w in registry.workers() if not is_gone(w, now, settings.worker_ttl_seconds)]
    finally:
        backends.close()
    if not live:
        out.print("no live workers", highlight=False)
        return
    # A pipe goes to a program (grep, cut, awk, a script): it gets every field whole, one
    # worker a line, split by tabs, not a table padded and cut to some assumed width.
    if out.is_terminal:
        out.print(_table([[_one_line(field) for field in _shown(worker, now)] for worker in live], out.width))
    else:
        for line in [COLUMNS, *(_fields(worker, now) for worker in live)]:
            typer.echo("\t".join(_one_line(field) for field in line))  # rich would expand the tabs


def _shown(worker: WorkerInfo, now: float) -> tuple[str, ...]:
    """A worker's fields for a reader: its start as an age (as its heartbeat), which fits
    where a full timestamp would crowd out the model."""
    return (*_fields(worker, now)[:-1], f"{_age(now - worker.started_at)} ago")


def _fields(worker: WorkerInfo, now: float) -> tuple[str, ...]:
    started = datetime.fromtimestamp(worker.started_at).astimezone().isoformat(timespec="seconds")
    seen = f"{max(0.0, now - worker.last_seen):.1f} s ago"
    return (worker.id, worker.host, str(worker.pid), worker.state, worker.model, worker.device, seen, started)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _one_line(field: str) -> str:
    """A field that cannot break its line or the tab-separated columns."""
    return " ".join(field.split())


def _table(rows: Sequence[Sequence[str]], width: int) -> Table:
    # No borders, as `docker ps` or `kubectl get`: at 80 columns every character is needed.
    table = Table(box=None, pad_edge=False, header_style="bold")
    gaps = 2 * (len(COLUMNS) - 1)  # a space either side of each column's inner edges
    natural = [max(cell_len(cell) for cell in column) for column in zip(COLUMNS, *rows, strict=True)]
    for name, fitted in zip(COLUMNS, _fit(natural, width - gaps), strict=True):
        table.add_column(name, width=fitted, no_wrap=True, overflow="ellipsis")
    for row in rows:
        # Text, not markup: "FLUX.1 Redux [schnell]" is a name, not a style.
        table.add_row(*(Text(cell, no_wrap=True, overflow="ellipsis") for cell in row))
    return table


def _fit(natural: list[int], room: int) -> list[int]:
    """Each column's width: the whole columns' their own, the shrinking ones' the room
    left, shared out so that the narrowest are cut least (each gets its own width or an
    even share of what is left, whichever is less), an ellipsis at the least. When even
    that does not fit (a long host name in a narrow terminal), the widest columns (the id
    first) are cut too: better than a table whose columns rich drops to fit."""
    widths = list(natural)
    shrinking = sorted((i for i, name in enumerate(COLUMNS) if name in SHRINKING), key=lambda i: natural[i])
    left = room - sum(natural[i] for i, name in enumerate(COLUMNS) if name not in SHRINKING)
    for served, i in enumerate(shrinking):
        widths[i] = max(1, min(natural[i], left // (len(shrinking) - served)))
        left -= widths[i]
    while sum(widths) > room and max(widths) > 1:
        widths[widths.index(max(widths))] -= 1
    return widths
