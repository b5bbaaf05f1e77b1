"""The ``fluxredux`` command: one module per command, registered on one typer app."""

from __future__ import annotations

from fluxredux.cli import download, predict
from fluxredux.cli.app import app

__all__ = ["app", "download", "main", "predict"]


def main() -> None:
    app()
