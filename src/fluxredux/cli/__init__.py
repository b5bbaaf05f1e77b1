"""The ``fluxredux`` command: one module per command, registered on one typer app."""

from __future__ import annotations

from fluxredux.cli import download, predict, run, serve, worker, workers
from fluxredux.cli.app import app

__all__ = ["app", "download", "main", "predict", "run", "serve", "worker", "workers"]


def main() -> None:
    app()
