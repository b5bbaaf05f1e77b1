"""The ``fluxredux`` command: one module per command, registered on one typer app.

The command needs the server extra (typer, rich, fastapi...), which an install for the
client alone (``pip install 'fluxredux[client]'``) does not have: ``main`` then says what to
install in one line, where importing the commands would end in a trace.
"""

from __future__ import annotations

import sys

# A third-party package the commands import, missing: the server extra is not installed.
_server_missing: ModuleNotFoundError | None = None
try:
    from fluxredux.cli import doctor, download, loras, predict, run, serve, upscale, worker, workers
    from fluxredux.cli.app import app
except ModuleNotFoundError as exc:
    if (exc.name or "fluxredux").partition(".")[0] == "fluxredux":
        raise  # a module of our own missing is a broken install, not a missing extra
    _server_missing = exc

__all__ = [
    "app",
    "doctor",
    "download",
    "loras",
    "main",
    "predict",
    "run",
    "serve",
    "upscale",
    "worker",
    "workers",
]


def main() -> None:
    if _server_missing is not None:
        print(
            f"error: the fluxredux command needs the server's packages ({_server_missing.name} is not "
            "installed): pip install 'fluxredux[server]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
    app()
