"""One job, as the Eachlabs-compatible API shows it: a thin translation of the state machine."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sse_starlette import ServerSentEvent

from fluxredux.api.eachlabs.shapes import Prediction, PublicStatus
from fluxredux.api.inputs import shown_references
from fluxredux.jobs.job import Job, Status

if TYPE_CHECKING:
    from fluxredux.api.streams import Moment

PUBLIC_STATUS: dict[Status, PublicStatus] = {
    Status.STARTING: "starting",
    Status.PROCESSING: "processing",
    Status.SUCCEEDED: "success",
    Status.FAILED: "error",
    Status.CANCELED: "cancelled",
}


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def file_url(base_url: str, name: str) -> str:
    return f"{base_url}/files/{name}"


def output_urls(job: Job, base_url: str) -> list[str] | None:
    """The generated images' URLs once it succeeded; None before (and when it did not)."""
    if job.status != Status.SUCCEEDED:
        return None
    return [file_url(base_url, name) for name in job.output]


def shown_input(job: Job, base_url: str) -> dict[str, Any]:
    """The input as recorded, stored references shown as links to their files."""
    return shown_references(job.input, job.input_files, lambda name: file_url(base_url, name))


def job_metrics(job: Job) -> dict[str, float]:
    """The worker's timings plus the times the store knows: queued, and in all."""
    metrics: dict[str, float] = dict(job.metrics)
    if job.started_at is not None:
        metrics["queue_time"] = round(job.started_at - job.created_at, 4)
    if job.completed_at is not None:
        metrics["total_time"] = round(job.completed_at - job.created_at, 4)
    return metrics


def running_phase(job: Job) -> str | None:
    """What a running job does after its last step; None while it denoises, and always for a
    queued or ended one (whatever a lost worker's last write left)."""
    return job.progress_phase if job.status == Status.PROCESSING else None


def render(job: Job, base_url: str, queue_position: int | None = None) -> Prediction:
    base_url = base_url.rstrip("/")
    urls = output_urls(job, base_url)
    output: str | list[str] | None = urls
    if urls is not None and job.input.get("num_outputs", 1) == 1 and len(urls) == 1:
        output = urls[0]
    total = job.progress_total or int(job.input.get("num_inference_steps", 4))
    return Prediction.model_validate(
        {
            "id": job.id,
            "model": job.model,
            "version": job.version,
            "status": PUBLIC_STATUS[job.status],
            "input": shown_input(job, base_url),
            "output": output,
            "error": job.error,
            "error_code": job.error_code,
            "logs": job.logs,
            "seed": job.seed,
            "metrics": job_metrics(job),
            "progress": {
                "step": job.progress_step,
                "total": total,
                "phase": running_phase(job),
                "preview": job.progress_preview if job.status == Status.PROCESSING else None,
            },
            "queue_position": queue_position if job.status == Status.STARTING else None,
            "safety": job.extra.get("safety", []),
            "demo": bool(job.extra.get("demo", False)),
            "upscaled_from": job.input.get("upscale_from"),
            "created_at": iso_time(job.created_at),
            "started_at": iso_time(job.started_at),
            "completed_at": iso_time(job.completed_at),
            "urls": {
                "get": f"{base_url}/v1/prediction/{job.id}",
                "cancel": f"{base_url}/v1/prediction/{job.id}/cancel",
                "stream": f"{base_url}/v1/prediction/{job.id}/stream",
            },
        }
    )


# The stream's last event, by how the prediction ended.
END_EVENTS = {Status.SUCCEEDED: "done", Status.FAILED: "failed", Status.CANCELED: "canceled"}


def stream_events(moment: Moment, base_url: str) -> list[ServerSentEvent]:
    """One moment of a prediction's stream (``GET /v1/prediction/{id}/stream``): its event,
    named as the moment is, with JSON data; the end's data is the prediction as ``GET``
    answers it. Outputs come with the end's body, not as events of their own."""
    job = moment.job
    data: dict[str, Any]
    name: str = moment.kind
    if moment.kind == "queued":
        data = {"status": "starting", "queue_position": moment.queue_position}
    elif moment.kind == "started":
        data = {"status": "processing", "attempt": job.attempt}
    elif moment.kind == "step":
        data = {"step": moment.step, "total": moment.total}
    elif moment.kind == "preview":
        data = {"step": moment.step, "image": job.progress_preview}
    elif moment.kind == "phase":
        data = {"phase": running_phase(job)}
    elif moment.kind == "end":
        name = END_EVENTS[job.status]
        data = render(job, base_url).model_dump(mode="json")
    else:  # "output": told by the end's body
        return []
    return [ServerSentEvent(json.dumps(data, separators=(",", ":")), event=name, id=moment.id)]
