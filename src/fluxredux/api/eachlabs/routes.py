"""/v1/prediction (the Eachlabs surface): create, get (long-poll), run (sync), cancel, list.
What it shares with the Replicate surface is in api/prediction_actions.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from fluxredux.access.keys import ApiKey
from fluxredux.api.deps import ApiKeyDep, BaseUrlDep, ReaderKeyDep, ServicesDep
from fluxredux.api.eachlabs.render import render, stream_events
from fluxredux.api.eachlabs.shapes import (
    Prediction,
    PredictionCreated,
    PredictionList,
    PredictionRequest,
    UpscaleRequest,
)
from fluxredux.api.errors import error_responses
from fluxredux.api.idempotent import IdempotencyKeyHeader, create_once, fingerprint
from fluxredux.api.prediction_actions import (
    PredictionOrder,
    cancel_owned,
    owned,
    owned_job,
    page_of_jobs,
    queue_job,
    wait_after_create,
    wait_until_done,
)
from fluxredux.api.services import Services
from fluxredux.api.streams import LastEventIdHeader, event_stream
from fluxredux.errors import UnknownModel
from fluxredux.jobs.job import Job, Status
from fluxredux.schema import MODEL_NAME

router = APIRouter(
    prefix="/v1/prediction", tags=["predictions"], responses=error_responses(400, 401, 404, 413, 429, 503)
)

WaitQuery = Annotated[
    float,
    Query(ge=0, le=60, description="Hold the request until the prediction ends, at most this many seconds."),
]


async def create_job(
    body: PredictionRequest, key: ApiKey, services: Services, base_url: str | None, prediction_id: str
) -> Job:
    """An Eachlabs create: the model must be this server's."""
    if body.model != MODEL_NAME:
        raise UnknownModel(f"unknown model '{body.model}'; this server runs '{MODEL_NAME}'", model=body.model)
    order = PredictionOrder(
        input=body.input,
        version=body.version,
        webhook_url=body.webhook_url,
        webhook_secret=body.webhook_secret,
        base_url=base_url,
    )
    return await queue_job(order, key, services, prediction_id)


async def create_idempotent(
    route: str,
    body: PredictionRequest,
    key: ApiKey,
    services: Services,
    base: str,
    idempotency_key: str | None,
) -> Job:
    return await create_once(
        services,
        key,
        idempotency_key,
        lambda: fingerprint(route, body.model_dump(mode="json")),
        lambda prediction_id: create_job(body, key, services, base, prediction_id),
    )


# The collection answers without its trailing slash too, rather than by a 307 to it: many
# clients follow that redirect with a GET, or without the body. Documented once (with it).
@router.post("", response_model=PredictionCreated, include_in_schema=False)
@router.post(
    "/", response_model=PredictionCreated, summary="Create a prediction", responses=error_responses(409)
)
async def create_prediction(
    body: PredictionRequest,
    key: ApiKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> PredictionCreated:
    job = await create_idempotent("/v1/prediction/", body, key, services, base, idempotency_key)
    return PredictionCreated(predictionID=job.id)


@router.post(
    "/run",
    response_model=Prediction,
    summary="Create a prediction and wait for its result",
    responses=error_responses(409),
)
async def run_prediction(
    body: PredictionRequest,
    key: ApiKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Prediction:
    job = await create_idempotent("/v1/prediction/run", body, key, services, base, idempotency_key)
    finished = await wait_after_create(services, job, services.settings.sync_wait_seconds)
    return render(finished, base)  # no queue position: it may be gone by now


@router.post(
    "/{prediction_id}/upscale",
    response_model=PredictionCreated,
    summary="Upscale one output of a finished prediction (a final from a draft)",
    responses=error_responses(409),
)
async def upscale_prediction(
    prediction_id: str,
    key: ApiKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    body: UpscaleRequest | None = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> PredictionCreated:
    """A create with ``upscale_from`` naming this prediction and ``index``: the final keeps
    the draft's composition, references, prompt and seed, refined at ``scale`` times its size."""
    asked = (body or UpscaleRequest()).create_input(prediction_id)
    try:
        request = PredictionRequest.model_validate({"input": asked})
    except ValidationError as exc:  # named as a create's input fields are
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    route = "/v1/prediction/{id}/upscale"
    job = await create_idempotent(route, request, key, services, base, idempotency_key)
    return PredictionCreated(predictionID=job.id)


@router.get("", response_model=PredictionList, include_in_schema=False)  # as the create: no redirect
@router.get("/", response_model=PredictionList, summary="Your predictions, newest first")
async def list_predictions(
    key: ReaderKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=64, description="The 'next' value of the previous page.")
    ] = None,
) -> PredictionList:
    page, next_cursor = await page_of_jobs(services, key, limit, cursor)
    return PredictionList(items=[render(job, base) for job in page], next=next_cursor)


@router.get("/{prediction_id}", response_model=Prediction, summary="Get a prediction (long-poll with ?wait=)")
async def get_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep, wait: WaitQuery = 0
) -> Prediction:
    if wait > 0:
        # Its first read checks the owner too: one read, and the wake-up subscribed before it.
        found = await wait_until_done(
            services,
            prediction_id,
            min(wait, services.settings.sync_wait_seconds),
            check=lambda job: owned(job, prediction_id, key),
        )
        assert found is not None  # owned() raises NotFound instead
        job = found
    else:
        job = await services.read(owned_job, services, prediction_id, key)
    return await render_live(services, job, base)


@router.get(
    "/{prediction_id}/stream",
    response_class=EventSourceResponse,
    summary="Follow a prediction as it runs (Server-Sent Events)",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Events queued (queue_position), started, step (step, total), phase, "
            "then done, failed or canceled with the prediction; each id resumes (Last-Event-ID).",
        }
    },
)
async def stream_prediction(
    prediction_id: str,
    key: ReaderKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    last_event_id: LastEventIdHeader = None,
) -> EventSourceResponse:
    job = await services.read(owned_job, services, prediction_id, key)
    return event_stream(services, job, key.id, last_event_id, lambda moment: stream_events(moment, base))


async def render_live(services: Services, job: Job, base: str) -> Prediction:
    """The prediction with what only the store knows now: its place in the queue."""
    position = None
    if job.status == Status.STARTING:
        position = await services.read(services.lifecycle.queue_position, job.id)
    return render(job, base, queue_position=position)


@router.post("/{prediction_id}/cancel", response_model=Prediction, summary="Cancel a prediction")
async def cancel_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> Prediction:
    return render(await cancel_owned(services, prediction_id, key), base)
