"""/v1/prediction: create, get (long-poll), run (sync), cancel, list."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Query

from fluxredux.api.deps import ApiKeyDep, BaseUrlDep, ReaderKeyDep, ServicesDep
from fluxredux.api.errors import error_responses
from fluxredux.api.inputs import recorded_input, resolve_references
from fluxredux.api.render import render
from fluxredux.api.services import Services
from fluxredux.config import Settings
from fluxredux.errors import (
    FetchRefused,
    FluxReduxError,
    InvalidInput,
    NotFound,
    QueueFull,
    RateLimited,
    StoreUnavailable,
    UnknownModel,
)
from fluxredux.jobs import Job, Status, new_id
from fluxredux.jobs.store import Capacity
from fluxredux.keys import ApiKey
from fluxredux.net import check_url_shape
from fluxredux.schema import MODEL_NAME, Prediction, PredictionCreated, PredictionList, PredictionRequest

router = APIRouter(
    prefix="/v1/prediction", tags=["predictions"], responses=error_responses(400, 401, 404, 413, 429, 503)
)

LONG_POLL_RECHECK_SECONDS = 5.0

WaitQuery = Annotated[
    float,
    Query(ge=0, le=60, description="Hold the request until the prediction ends, at most this many seconds."),
]


def capacity_error(settings: Settings, capacity: Capacity) -> FluxReduxError | None:
    if capacity.in_flight >= settings.max_in_flight_per_key:
        return RateLimited(
            f"too many predictions in flight: {capacity.in_flight} of {settings.max_in_flight_per_key} "
            "allowed per API key; wait for one to finish",
            retry_after=2,
            limit=settings.max_in_flight_per_key,
        )
    if capacity.queued >= settings.max_queue:
        return QueueFull(f"the server's queue is full ({settings.max_queue} waiting); try again shortly")
    return None


async def check_webhook_target(services: Services, url: str) -> None:
    """Refuse a webhook URL now, naming the field, rather than drop its deliveries later."""
    timeout = services.settings.fetch_timeout_seconds
    try:
        await asyncio.wait_for(services.fetcher.checked_address(check_url_shape(url)), timeout)
    except FetchRefused as exc:
        raise FetchRefused(exc.code, f"webhook_url: {exc.message}", field="webhook_url") from None
    except asyncio.TimeoutError:
        raise FetchRefused(
            "url_dns", f"webhook_url: its host did not resolve within {timeout:g} s", field="webhook_url"
        ) from None


async def create_job(body: PredictionRequest, key: ApiKey, services: Services) -> Job:
    """Validate everything, check limits, store the reference image, queue the job."""
    settings = services.settings
    if body.model != MODEL_NAME:
        raise UnknownModel(f"unknown model '{body.model}'; this server runs '{MODEL_NAME}'", model=body.model)
    refusal = services.workers.refusal()
    if refusal is not None:  # accepting work that no worker can run would only hide the problem
        raise refusal
    # Refuse early, before fetching or decoding anything; the insert below checks again.
    early = Capacity(
        in_flight=await asyncio.to_thread(services.lifecycle.in_flight, key.id),
        queued=await asyncio.to_thread(services.lifecycle.queue_depth),
        accepted=False,
    )
    if (error := capacity_error(settings, early)) is not None:
        raise error
    if body.webhook_url:
        await check_webhook_target(services, body.webhook_url)
    # With Redis, counting is a network call: never on the event loop.
    await asyncio.to_thread(services.creations.hit, key.id, "prediction creations")
    stored = await resolve_references(
        body.input, services.blobs, services.uploads, services.fetcher, services.decode_limits
    )
    job = Job(
        id=new_id(),
        owner=key.id,
        input=recorded_input(body.input, stored),
        # The store's clock, not this node's: queue order and paging must not depend on
        # which API node took the request.
        created_at=await asyncio.to_thread(services.store.now),
        version=body.version,
        webhook_url=body.webhook_url,
        webhook_secret=body.webhook_secret,
        input_files=[image.name for image in stored],
        progress_total=body.input.num_inference_steps,
    )
    # Count and insert in one store operation: concurrent creations (of this process or
    # another) cannot push a key over its in-flight limit or the queue over its cap.
    try:
        capacity = await asyncio.to_thread(
            services.lifecycle.create_if_under_capacity,
            job,
            settings.max_in_flight_per_key,
            settings.max_queue,
        )
        if not capacity.accepted:
            raise capacity_error(settings, capacity) or QueueFull("the server's queue is full; try again")
    except FluxReduxError:
        # Refused: the copies made for this request go (an upload stays).
        await asyncio.to_thread(services.blobs.delete, [image.name for image in stored if image.saved_now])
        raise
    services.workers.wake()
    return job


async def wait_until_done(services: Services, job_id: str, timeout: float) -> Job | None:
    """Long-poll: woken by the job's state change, not by re-reading on a timer."""
    deadline = time.monotonic() + timeout
    event = services.notifier.subscribe(job_id)
    try:
        while True:
            event.clear()  # before reading: a change that lands after the read still wakes us
            job = await asyncio.to_thread(services.store.get, job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.is_terminal or remaining <= 0:
                return job
            with contextlib.suppress(asyncio.TimeoutError):
                # Re-read now and then even without a wake-up: a lost message (a bus
                # reconnecting, a worker on another machine) costs latency, never the answer.
                await asyncio.wait_for(event.wait(), min(remaining, LONG_POLL_RECHECK_SECONDS))
    finally:
        services.notifier.unsubscribe(job_id, event)


def owned_job(services: Services, job_id: str, key: ApiKey) -> Job:
    """The caller's job (blocking: call it through asyncio.to_thread)."""
    job = services.store.get(job_id)
    if job is None or job.owner != key.id:  # another key's prediction is as good as absent
        raise NotFound(f"no prediction with id '{job_id}'", id=job_id)
    return job


@router.post("/", response_model=PredictionCreated, summary="Create a prediction")
async def create_prediction(
    body: PredictionRequest, key: ApiKeyDep, services: ServicesDep
) -> PredictionCreated:
    job = await create_job(body, key, services)
    return PredictionCreated(predictionID=job.id)


@router.post("/run", response_model=Prediction, summary="Create a prediction and wait for its result")
async def run_prediction(
    body: PredictionRequest, key: ApiKeyDep, services: ServicesDep, base: BaseUrlDep
) -> Prediction:
    job = await create_job(body, key, services)
    try:
        finished = await wait_until_done(services, job.id, services.settings.sync_wait_seconds)
    except StoreUnavailable:
        finished = None  # accepted all the same: answer with it, so a retry does not duplicate it
    return render(finished or job, base)  # no queue position: it may be gone by now


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
    before = None
    if cursor:
        try:
            before = float(cursor)
        except ValueError:
            raise InvalidInput(
                "invalid cursor: pass the 'next' value of the previous page", cursor=cursor
            ) from None
    jobs = await asyncio.to_thread(services.store.list_by_owner, key.id, limit + 1, before)
    page = jobs[:limit]
    next_cursor = repr(page[-1].created_at) if len(jobs) > limit else None
    return PredictionList(items=[render(job, base) for job in page], next=next_cursor)


@router.get("/{prediction_id}", response_model=Prediction, summary="Get a prediction (long-poll with ?wait=)")
async def get_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep, wait: WaitQuery = 0
) -> Prediction:
    job = await asyncio.to_thread(owned_job, services, prediction_id, key)
    if wait > 0 and not job.is_terminal:
        job = (
            await wait_until_done(services, prediction_id, min(wait, services.settings.sync_wait_seconds))
            or job
        )
    return await render_live(services, job, base)


async def render_live(services: Services, job: Job, base: str) -> Prediction:
    """The prediction with what only the store knows now: its place in the queue."""
    position = None
    if job.status == Status.STARTING:
        position = await asyncio.to_thread(services.lifecycle.queue_position, job.id)
    return render(job, base, queue_position=position)


@router.post("/{prediction_id}/cancel", response_model=Prediction, summary="Cancel a prediction")
async def cancel_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> Prediction:
    await asyncio.to_thread(owned_job, services, prediction_id, key)
    job = await asyncio.to_thread(services.lifecycle.cancel, prediction_id)
    if job is None:
        raise NotFound(f"no prediction with id '{prediction_id}'", id=prediction_id)
    return render(job, base)
