"""What the HTTP process knows about the workers that run its predictions.

One small protocol, so that the API does not care who runs the model: the supervisor
of a local worker process (``fluxredux serve``) implements it today; a registry of
workers on other machines implements the same questions later.
"""

from __future__ import annotations

from typing import Any, Protocol

from fluxredux.errors import FluxReduxError


class WorkerMonitor(Protocol):
    def status(self) -> dict[str, Any]:
        """The model and worker as ``/health`` shows them (``ready``, ``demo``, ``pid``, ...)."""

    def problems(self) -> list[str]:
        """Why accepted predictions would not run now; empty when they would (``/ready``)."""

    def refusal(self) -> FluxReduxError | None:
        """The error to answer a create with while no worker can take it, else None."""

    def wake(self) -> None:
        """A job was queued: wake an idle worker (a lost wake-up only delays the job)."""
