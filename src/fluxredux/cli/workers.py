"""``fluxredux workers``: who is running predictions, with which model, last seen when."""

from __future__ import annotations

from datetime import datetime

from rich.table import Table

from fluxredux.cli.app import app, out, plain_errors
from fluxredux.cli.options import DataDirOption, RedisOption, settings_from


@app.command()
def workers(data_dir: DataDirOption = None, redis: RedisOption = None) -> None:
    """List the live workers: id, host, process, state, model, device, last heartbeat.

    Those of the data dir's server, or with --redis those of the whole deployment."""
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
    table = Table("worker", "host", "pid", "state", "model", "device", "last heartbeat", "started")
    for worker in live:
        started = datetime.fromtimestamp(worker.started_at).isoformat(timespec="seconds")
        seen = f"{max(0.0, now - worker.last_seen):.1f} s ago"
        table.add_row(
            worker.id, worker.host, str(worker.pid), worker.state, worker.model, worker.device, seen, started
        )
    out.print(table)
