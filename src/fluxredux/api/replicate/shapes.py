"""The Replicate-compatible HTTP contract: request and answer shapes only.

The input itself is ``fluxredux.schema.PredictionInput``, the one input model of every
surface; this module only wraps it the way Replicate's API does. Like ``schema``, it
imports pydantic, the standard library and the job's plain types (its webhook events).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fluxredux.jobs.job import WebhookEvent
from fluxredux.schema import MAX_NAME_CHARS, PredictionInput

# The hosted model's name, as Replicate's clients call it.
REPLICATE_MODEL = "black-forest-labs/flux-redux-schnell"

ReplicateStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]


class ReplicatePredictionRequest(BaseModel):
    """Body of ``POST /v1/predictions`` and ``POST /v1/models/{owner}/{name}/predictions``."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None,
        max_length=MAX_NAME_CHARS,
        description="Accepted and recorded (this server runs one model); on /v1/predictions an "
        "'owner/name' or 'owner/name:version' must name the model this server runs.",
    )
    input: PredictionInput
    webhook: str | None = Field(
        None, max_length=2048, description="Receives the prediction (POST) on the events asked for."
    )
    stream: bool | None = Field(
        None,
        description="Accepted, as the official client's stream() sends it: every prediction has urls.stream.",
    )
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="Which events are sent to the webhook: start, output, logs, completed "
        "(default: all of them). Non-final events are throttled; completed is always sent.",
    )


class ReplicatePredictionUrls(BaseModel):
    get: str
    cancel: str
    web: str
    stream: str = Field(description="Server-Sent Events of the prediction as it runs (logs, output, done).")


class ReplicatePrediction(BaseModel):
    """A prediction as Replicate's API shows it."""

    id: str
    model: str = Field(description="owner/name")
    version: str
    status: ReplicateStatus
    input: dict[str, Any]
    output: list[str] | None = Field(None, description="The generated images' URLs, once it succeeded.")
    error: str | None = None
    logs: str = ""
    metrics: dict[str, float] = Field(default_factory=dict, description="predict_time, total_time, ...")
    source: Literal["api"] = "api"
    data_removed: bool = False
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    urls: ReplicatePredictionUrls


class ReplicatePredictionPage(BaseModel):
    previous: str | None = Field(None, description="Always null: pages are read newest first, forwards.")
    next: str | None = Field(None, description="The URL of the next (older) page.")
    results: list[ReplicatePrediction]


class ReplicateFileUrls(BaseModel):
    get: str = Field(description="Usable as redux_image (and downloads the file).")


class ReplicateFile(BaseModel):
    """An uploaded file, as Replicate's API shows it."""

    id: str = Field(description="Also usable as redux_image.")
    name: str
    content_type: str
    size: int
    etag: str
    checksums: dict[str, str]
    metadata: dict[str, Any]
    created_at: str
    expires_at: str | None
    urls: ReplicateFileUrls


class WebhookSigningSecret(BaseModel):
    key: str = Field(description="whsec_<base64>: verify deliveries with the standardwebhooks package.")


class ReplicateVersion(BaseModel):
    """A model version, as Replicate's API shows it: the official client reads one after
    running a pinned ``owner/name:version`` (its ``openapi_schema`` says how outputs come)."""

    id: str
    created_at: str
    cog_version: str = Field(description="Not a Cog model: names fluxredux's API instead.")
    openapi_schema: dict[str, Any] = Field(description="Input (the one input model) and Output schemas.")


class ReplicateModel(BaseModel):
    """The model this server runs, as Replicate's API shows a model."""

    url: str
    owner: str
    name: str
    description: str
    visibility: Literal["public", "private"] = "private"
    github_url: str | None = None
    paper_url: str | None = None
    license_url: str | None = None
    run_count: int = 0
    cover_image_url: str | None = None
    default_example: dict[str, Any] | None = None
    latest_version: ReplicateVersion


def version_schema() -> dict[str, Any]:
    """Cog's shape of a version's schema: the input model's JSON schema, and the output as
    a list of image URLs (what the hosted model returns)."""
    return {
        "openapi": "3.0.2",
        "info": {"title": "fluxredux", "version": "1"},
        "components": {
            "schemas": {
                "Input": PredictionInput.model_json_schema(),
                "Output": {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"},
            }
        },
    }
