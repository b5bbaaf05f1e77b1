"""A prediction job and its lifecycle states. Pure data: no storage, no HTTP."""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal


class Status(str, Enum):
    """starting -> processing -> succeeded | failed | canceled; terminal states never change.

    (processing -> starting happens once when a worker is lost and the job is re-run.)
    """

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})
IN_FLIGHT = frozenset({Status.STARTING, Status.PROCESSING})


# The API surfaces a job can be created on: its webhooks take that surface's body and signing.
Surface = Literal["eachlabs", "replicate"]
EACHLABS: Surface = "eachlabs"
REPLICATE: Surface = "replicate"

# Replicate's webhook events; the Eachlabs surface's webhook is the ``completed`` one.
WebhookEvent = Literal["start", "output", "logs", "completed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "output", "logs", "completed")


def new_id() -> str:
    """128 random bits, URL-safe. Not a secret (ids travel in logs and webhooks): reading a
    prediction needs its owner's key, and sharing uses tokens of its own."""
    return secrets.token_urlsafe(16)


@dataclass
class Job:
    id: str
    owner: str  # the API key id that created it
    input: dict[str, Any]
    created_at: float
    status: Status = Status.STARTING
    model: str = "flux-redux-schnell"
    version: str = "0.0.1"
    started_at: float | None = None
    completed_at: float | None = None
    attempt: int = 0  # how many times a worker claimed it
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    progress_step: int = 0
    progress_total: int = 0
    # What a running job does after its last step (decoding, safety check, encoding,
    # storing): None while it denoises, or before it starts.
    progress_phase: str | None = None
    # A running job's latest step preview (input preview: true): a small JPEG as a data
    # URI, dropped when it ends or goes back to the queue.
    progress_preview: str | None = None
    output: list[str] = field(default_factory=list)  # output file names
    seed: int | None = None
    error: str | None = None
    error_code: str | None = None
    logs: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. per-image safety flags
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_state: str | None = None  # pending -> delivered | failed
    input_files: list[str] = field(default_factory=list)  # the stored reference images, in order
    surface: Surface = EACHLABS  # the API it was created on
    # Which webhook events its receiver wants (of WEBHOOK_EVENTS): the final one by default.
    webhook_events: list[WebhookEvent] = field(default_factory=lambda: ["completed"])

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def wants_final_webhook(self) -> bool:
        """Whether its end is delivered: asked as ``completed``, or as ``output`` when it
        succeeded (this model's output appears all at once, when the prediction ends)."""
        if not self.webhook_url:
            return False
        return "completed" in self.webhook_events or (
            "output" in self.webhook_events and self.status == Status.SUCCEEDED
        )


_FIELDS = tuple(f.name for f in dataclasses.fields(Job))


def job_to_json(job: Job) -> str:
    """The stored form of a job, the same in every backend (SQLite column, Redis document).

    Its fields as they are, not ``dataclasses.asdict``: that deep-copies every nested value
    first, which json.dumps does not need (its fields hold plain JSON values, no dataclass),
    and made this several times slower on every write of every job."""
    data = {name: getattr(job, name) for name in _FIELDS}
    data["status"] = job.status.value
    return json.dumps(data, separators=(",", ":"))


def job_from_json(data: str) -> Job:
    fields = json.loads(data)
    fields["status"] = Status(fields["status"])
    if "input_file" in fields:  # stored before several references: its one image
        legacy = fields.pop("input_file")
        fields["input_files"] = [legacy] if legacy else []
    return Job(**fields)
