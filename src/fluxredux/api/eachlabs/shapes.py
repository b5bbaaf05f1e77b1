"""The hosted (Eachlabs) contract's request and answer shapes.

The input itself is ``fluxredux.schema.PredictionInput``, the one input model of every
surface; these wrap it and describe what the API answers. pydantic and the standard
library only: the client parses answers with the same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fluxredux.schema import MAX_NAME_CHARS, MODEL_NAME, MODEL_VERSION, PredictionInput, UpscaleSource

# --- the HTTP contract (Eachlabs-compatible) ----------------------------------------


def _absent(value: object) -> bool:
    return value is None


PublicStatus = Literal["starting", "processing", "success", "error", "cancelled"]


class PredictionRequest(BaseModel):
    """Body of ``POST /v1/prediction/`` (and ``/v1/prediction/run``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(MODEL_NAME, max_length=MAX_NAME_CHARS, description=f"Must be '{MODEL_NAME}'.")
    version: str = Field(MODEL_VERSION, max_length=MAX_NAME_CHARS, description="Accepted and recorded.")
    input: PredictionInput
    webhook_url: str | None = Field(
        None, max_length=2048, description="Receives the prediction (POST) when it reaches a terminal state."
    )
    webhook_secret: str | None = Field(
        None, max_length=256, description="Signs this prediction's webhook (HMAC-SHA256); see the docs."
    )


class UpscaleRequest(BaseModel):
    """Body of ``POST /v1/prediction/{id}/upscale``: a final from one of that prediction's
    outputs; a shortcut for a create with ``upscale_from``. The fields are checked as that
    create's input is (the one input model), so each is only typed here: strictly, so that
    a JSON true is not read as 1 on its way there (the input model refuses it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    index: int = Field(0, description="Which output of the draft (0: the first).")
    scale: int | None = Field(
        None, description="2 or 4: the final's sides are this many times the draft's (2)."
    )
    upscale_strength: float | None = Field(
        None, description="How far from the draft the final may go (0.35)."
    )
    seed: int | None = Field(None, description="The draft's unless given.")
    num_outputs: int | None = None
    num_inference_steps: int | None = None
    output_format: str | None = None
    output_quality: int | None = None
    disable_safety_checker: bool | None = None

    def create_input(self, prediction_id: str) -> dict[str, Any]:
        """The create's ``input``: the fields given, and the draft named."""
        fields = self.model_dump(exclude_none=True, exclude={"index"})
        return {**fields, "upscale_from": {"prediction": prediction_id, "index": self.index}}


class PredictionCreated(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Prediction created successfully"
    predictionID: str


class PredictionMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")  # plus per-stage timings: prior, denoise, ...

    predict_time: float | None = None
    queue_time: float | None = None
    total_time: float | None = None


class PredictionUrls(BaseModel):
    get: str
    cancel: str
    # Optional: the client reads predictions of servers without streams too (the hosted API).
    stream: str | None = Field(None, description="Server-Sent Events of the prediction as it runs.")


class PredictionProgress(BaseModel):
    step: int
    total: int
    # After the last step: what the prediction is doing now ("decoding", "safety check",
    # "encoding", "storing"); None while it denoises.
    phase: str | None = None
    # With input preview: the latest step's preview while it runs (a JPEG data URI).
    preview: str | None = Field(None, exclude_if=_absent)


class Prediction(BaseModel):
    """A prediction as ``GET /v1/prediction/{id}`` returns it."""

    id: str
    model: str
    version: str
    status: PublicStatus
    input: dict[str, Any]
    output: str | list[str] | None = Field(
        None, description="One URL when one image was asked for, a list of URLs otherwise."
    )
    error: str | None = None
    error_code: str | None = None
    logs: str = ""
    seed: int | None = None
    metrics: PredictionMetrics
    progress: PredictionProgress
    queue_position: int | None = Field(
        None, description="While it waits: how many accepted predictions will run before it (0: next)."
    )
    safety: list[dict[str, Any]] = Field(default_factory=list, description="Per generated image.")
    demo: bool = Field(False, description="True when the demo model made it: the images are noise.")
    # Only on a final (made with upscale_from): absent otherwise, as from the hosted API.
    upscaled_from: UpscaleSource | None = Field(
        None,
        description="A final's draft: the prediction and output it was upscaled from.",
        exclude_if=_absent,
    )
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    urls: PredictionUrls


StreamEventName = Literal["queued", "started", "step", "phase", "preview", "done", "failed", "canceled"]


class StreamEvent(BaseModel):
    """One event of ``GET /v1/prediction/{id}/stream``, as the Python client yields it."""

    event: StreamEventName
    id: str = Field(description="Its Last-Event-ID: a stream resumed after it misses no step.")
    queue_position: int | None = None  # queued
    attempt: int | None = None  # started (2: run again, after a lost worker)
    step: int | None = None  # step, preview
    total: int | None = None  # step
    phase: str | None = None  # phase: after the last step
    image: str | None = None  # preview: a JPEG data URI
    prediction: Prediction | None = None  # done, failed, canceled: the prediction as it ended

    @property
    def ended(self) -> bool:
        return self.prediction is not None


class PredictionList(BaseModel):
    items: list[Prediction]
    next: str | None = Field(None, description="Pass as ?cursor= for the next (older) page.")


class UploadedFile(BaseModel):
    id: str = Field(description="Usable as redux_image.")
    url: str
    content_type: str
    size: int
    width: int
    height: int


# GET /v1/loras (both surfaces' callers use it; the client reads it too).
class LoraAdapter(BaseModel):
    name: str = Field(description="What to give as loras[].name.")
    source: Literal["local", "hub"] = Field(
        description="local: a file on this server; hub: Hugging Face repos of this pattern "
        "(owner/* or owner/repo), fetched by a worker on first use."
    )
    rank: int | None = Field(description="The adapter's LoRA rank (unknown for a hub pattern).")
    size: int | None = Field(description="Its file's size in bytes (unknown for a hub pattern).")


class LoraList(BaseModel):
    adapters: list[LoraAdapter]
    max_loras: int = Field(description="At most this many per prediction.")
    max_rank: int = Field(description="The largest rank this server accepts.")
