"""One job, as the Replicate-compatible API shows it: the same state machine, Replicate's
names (its statuses are the lifecycle's own), output always a list of URLs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sse_starlette import ServerSentEvent

from fluxredux.api.eachlabs.render import (
    file_url,
    iso_time,
    job_metrics,
    output_urls,
    running_phase,
    shown_input,
)
from fluxredux.api.replicate.shapes import REPLICATE_MODEL, ReplicatePrediction
from fluxredux.jobs.job import Job, Status

if TYPE_CHECKING:
    from fluxredux.api.streams import Moment


def prediction_url(base_url: str, job_id: str) -> str:
    return f"{base_url}/v1/predictions/{job_id}"


def progress_line(step: int, total: int) -> str:
    """A tqdm-style line, as Replicate's models log progress: the official client reads it
    back as ``prediction.progress``."""
    done = round(10 * step / total)
    return f"{round(100 * step / total):3d}%|{'█' * done}{' ' * (10 - done)}| {step}/{total}"


def shown_logs(job: Job) -> str:
    """The job's logs; while it runs, its progress as the last line, and after its last
    step what it does now ("decoding…") on the line above it. The bar stays last: the
    official clients read ``progress`` from the last line that looks like a tqdm bar, and
    simpler readers (and the logs webhooks' receivers) look at the last line only."""
    if job.status != Status.PROCESSING:
        return job.logs
    lines = [job.logs] if job.logs else []
    phase = running_phase(job)
    if phase is not None:
        lines.append(f"{phase}…")
    if job.progress_total and job.progress_step:
        lines.append(progress_line(job.progress_step, job.progress_total))
    return "\n".join(lines)


def render_replicate(job: Job, base_url: str, *, waited_out: bool = False) -> ReplicatePrediction:
    """``waited_out``: the answer to a create whose ``Prefer: wait`` ran out before the end.
    Such a prediction is shown as ``starting`` whatever it is doing, as Replicate does:
    the official client polls only a ``starting`` answer, and takes any other status of a
    waited create as final (it would return no output)."""
    base_url = base_url.rstrip("/")
    status = "starting" if waited_out and not job.is_terminal else job.status.value
    return ReplicatePrediction.model_validate(
        {
            "id": job.id,
            "model": REPLICATE_MODEL,
            "version": job.version,
            "status": status,
            "input": shown_input(job, base_url),
            "output": output_urls(job, base_url),
            "error": job.error,
            "logs": shown_logs(job),
            "metrics": job_metrics(job),
            "created_at": iso_time(job.created_at),
            "started_at": iso_time(job.started_at),
            "completed_at": iso_time(job.completed_at),
            "urls": {
                "get": prediction_url(base_url, job.id),
                "cancel": f"{prediction_url(base_url, job.id)}/cancel",
                "stream": f"{prediction_url(base_url, job.id)}/stream",
                # No page per prediction: the playground, where predictions are made.
                "web": f"{base_url}/",
            },
        }
    )


def stream_events(moment: Moment, base_url: str) -> list[ServerSentEvent]:
    """One moment of a prediction's stream in Replicate's event format, as its official
    client's ``stream()`` reads it: only ``logs`` (log lines: the queue, the start, a
    tqdm-style line per step, the phases), ``output`` (one per image: its URL), ``error``
    (the message; the client raises it) and ``done`` (``{}``, or the reason it ended
    otherwise). Any other event name would make that client fail."""
    job = moment.job
    if moment.kind == "queued":
        ahead = moment.queue_position or 0
        lines = [f"waiting in the queue ({ahead} ahead)" if ahead else "waiting in the queue (next)"]
    elif moment.kind == "started":
        lines = ["starting" if job.attempt == 1 else f"starting again (attempt {job.attempt})"]
    elif moment.kind == "step":
        lines = [progress_line(moment.step, moment.total)]
    elif moment.kind == "phase":
        lines = [f"{running_phase(job)}…"]
    elif moment.kind == "preview":  # Replicate's events have no place for a picture
        return []
    elif moment.kind == "output":
        return [
            ServerSentEvent(file_url(base_url.rstrip("/"), str(moment.output)), event="output", id=moment.id)
        ]
    elif job.status == Status.FAILED:
        done = json.dumps({"reason": "error"})
        return [
            ServerSentEvent(job.error or "the prediction failed", event="error", id=moment.id),
            ServerSentEvent(done, event="done", id=moment.id),
        ]
    else:
        reason = {} if job.status == Status.SUCCEEDED else {"reason": "canceled"}
        return [ServerSentEvent(json.dumps(reason), event="done", id=moment.id)]
    return [ServerSentEvent(line, event="logs", id=moment.id) for line in lines]
