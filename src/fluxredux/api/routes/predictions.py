"""/v1/prediction: create, get (long-poll), run (sync), cancel, list."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query

from fluxredux.api.deps import ApiKeyDep, BaseUrlDep, ReaderKeyDep, ServicesDep
from fluxredux.api.errors import error_responses
from fluxredux.api.idempotent import IdempotencyKeyHeader, create_once, fingerprint
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
from fluxredux.jobs.model import EACHLABS
from fluxredux.jobs.store import Capacity
from fluxredux.keys import ApiKey
from fluxredux.net import check_url_shape
from fluxredux.schema import (
    MODEL_NAME,
    MODEL_VERSION,
    Prediction,
    PredictionCreated,
    PredictionInput,
    PredictionList,
    PredictionRequest,
)

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


async def check_webhook_target(services: Services, url: str, field: str = "webhook_url") -> None:
    """Refuse a webhook URL now, naming the field, rather than drop its deliveries later."""
    timeout = services.settings.fetch_timeout_seconds
    try:
        await asyncio.wait_for(services.fetcher.checked_address(check_url_shape(url)), timeout)
    except FetchRefused as exc:
        raise FetchRefused(exc.code, f"{field}: {exc.message}", field=field) from None
    except asyncio.TimeoutError:
        raise FetchRefused(
            "url_dns", f"{field}: its host did not resolve within {timeout:g} s", field=field
        ) from None


@dataclass(frozen=True)
class PredictionOrder:
    """What a create asks for, whichever API surface it came to."""

    input: PredictionInput
    version: str = MODEL_VERSION
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_events: tuple[str, ...] = ("completed",)
    webhook_field: str = "webhook_url"  # how the request names the webhook (in errors)
    surface: str = EACHLABS
    # This server's base URL: a reference linking to one of its own uploads is used as
    # that upload (the Replicate client passes uploads by their URL), not fetched.
    base_url: str | None = None


async def create_job(
    body: PredictionRequest, key: ApiKey, services: Services, base_url: str | None = None
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
    return await queue_job(order, key, services)


async def queue_job(order: PredictionOrder, key: ApiKey, services: Services) -> Job:
    """Validate everything, check limits, store the reference image, queue the job."""
    settings = services.settings
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
    if order.webhook_url:
        await check_webhook_target(services, order.webhook_url, order.webhook_field)
    # With Redis, counting is a network call: never on the event loop.
    await asyncio.to_thread(services.creations.hit, key.id, "prediction creations")
    own_files = f"{order.base_url.rstrip('/')}/files/" if order.base_url else None
    stored = await resolve_references(
        order.input, services.blobs, services.uploads, services.fetcher, services.decode_limits, own_files
    )
    job = Job(
        id=new_id(),
        owner=key.id,
        input=recorded_input(order.input, stored),
        # The store's clock, not this node's: queue order and paging must not depend on
        # which API node took the request.
        created_at=await asyncio.to_thread(services.store.now),
        version=order.version,
        webhook_url=order.webhook_url,
        webhook_secret=order.webhook_secret,
        webhook_events=list(order.webhook_events),
        surface=order.surface,
        input_files=[image.name for image in stored],
        progress_total=order.input.num_inference_steps,
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
    await services.webhooks.enqueue_event(job, "start")  # when its receiver asked for it
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
        fingerprint(route, body.model_dump(mode="json")),
        lambda: create_job(body, key, services, base),
    )


async def wait_after_create(services: Services, job: Job, timeout: float) -> Job:
    """The job once it ended, or as it is after ``timeout`` s; a store that cannot be read
    meanwhile gives the job as created (accepted all the same: a retry must not duplicate it)."""
    if job.is_terminal:
        return job
    try:
        return await wait_until_done(services, job.id, timeout) or job
    except StoreUnavailable:
        return job


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


def parse_cursor(cursor: str | None) -> float | None:
    """A page's cursor: the creation time of the last prediction of the page before."""
    if not cursor:
        return None
    try:
        return float(cursor)
    except ValueError:
        raise InvalidInput(
            "invalid cursor: pass the 'next' value of the previous page", cursor=cursor
        ) from None


async def page_of_jobs(
    services: Services, key: ApiKey, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """The caller's jobs, newest first, from ``cursor`` on; and the next page's cursor."""
    before = parse_cursor(cursor)
    jobs = await asyncio.to_thread(services.store.list_by_owner, key.id, limit + 1, before)
    page = jobs[:limit]
    return page, repr(page[-1].created_at) if len(jobs) > limit else None


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


async def cancel_owned(services: Services, prediction_id: str, key: ApiKey) -> Job:
    """Cancel the caller's prediction (idempotent); the job as it is after."""
    await asyncio.to_thread(owned_job, services, prediction_id, key)
    job = await asyncio.to_thread(services.lifecycle.cancel, prediction_id)
    if job is None:
        raise NotFound(f"no prediction with id '{prediction_id}'", id=prediction_id)
    return job


@router.post("/{prediction_id}/cancel", response_model=Prediction, summary="Cancel a prediction")
async def cancel_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> Prediction:
    return render(await cancel_owned(services, prediction_id, key), base)
