"""The Replicate-compatible surface: /v1/models/{owner}/{name}/predictions,
/v1/predictions (create, get, cancel, list), the model and its versions, and the webhook
signing secret.

A translation of the one prediction state machine, not a second one: creates go through
``queue_job`` (the Eachlabs surface's own), reads, cancels and lists through the same
store and lifecycle, so a prediction made on either surface is read, cancelled and listed
on both. Only the shapes differ: ``render_replicate`` answers, errors are problem details
(``api/errors.py`` picks the shape by path). Files are in routes/files.py.
"""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from sse_starlette import EventSourceResponse

from fluxredux.access.keys import ApiKey
from fluxredux.api.deps import ApiKeyDep, BaseUrlDep, PresentedKeyDep, ReaderKeyDep, ServicesDep
from fluxredux.api.errors import problem_responses
from fluxredux.api.idempotent import IdempotencyKeyHeader, create_once, fingerprint
from fluxredux.api.prediction_actions import (
    PredictionOrder,
    cancel_owned,
    owned_job,
    page_of_jobs,
    queue_job,
    wait_after_create,
)
from fluxredux.api.replicate.render import render_replicate, stream_events
from fluxredux.api.replicate.shapes import (
    REPLICATE_MODEL,
    ReplicateModel,
    ReplicatePrediction,
    ReplicatePredictionPage,
    ReplicatePredictionRequest,
    ReplicateVersion,
    WebhookSigningSecret,
    version_schema,
)
from fluxredux.api.services import Services
from fluxredux.api.streams import LastEventIdHeader, event_stream
from fluxredux.config import Settings
from fluxredux.errors import InvalidInput, UnknownModel
from fluxredux.jobs.job import REPLICATE, WEBHOOK_EVENTS
from fluxredux.schema import MAX_NAME_CHARS, MODEL_VERSION
from fluxredux.webhooks.signing import signing_secret

router = APIRouter(
    tags=["replicate-compatible"], responses=problem_responses(400, 401, 404, 409, 413, 422, 429, 503)
)

MAX_PREFER_WAIT = 60

PreferHeader = Annotated[
    str | None,
    Header(
        max_length=256,
        description="wait (up to 60 s) or wait=N (1-60): hold the create until the prediction ends or "
        "N seconds pass, then answer with it (still running: shown as starting, as Replicate does).",
    ),
]


def prefer_wait(prefer: str | None, settings: Settings) -> float | None:
    """Seconds to hold a create for, from ``Prefer``; None when it asks for no wait.
    Other preferences are ignored (RFC 7240); a wait outside 1-60 s is a 422."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        seconds = value.strip() or str(MAX_PREFER_WAIT)
        if not seconds.isdigit() or not 1 <= int(seconds) <= MAX_PREFER_WAIT:
            raise InvalidInput(
                f"Prefer: wait must be 'wait' or 'wait=N' with N from 1 to {MAX_PREFER_WAIT}",
                fields=[
                    {
                        "field": "Prefer",
                        "message": f"wait=N, N from 1 to {MAX_PREFER_WAIT}",
                        "type": "value_error",
                    }
                ],
                header="Prefer",
            )
        return min(float(seconds), settings.sync_wait_seconds)
    return None


def served_models(settings: Settings) -> set[str]:
    return {REPLICATE_MODEL} | ({settings.replicate_model_alias} if settings.replicate_model_alias else set())


def check_model(model: str, settings: Settings) -> None:
    if model not in served_models(settings):
        raise UnknownModel(f"model '{model}' not found; this server runs '{REPLICATE_MODEL}'", model=model)


async def known_model(owner: str, name: str, services: ServicesDep) -> str:
    """The ``owner/name`` of the path, which must be this server's. A dependency, so that
    it is checked before the body is: a model this server does not run is a 404 whatever
    its input, not a 422 about an input it would never have run."""
    model = f"{owner}/{name}"
    check_model(model, services.settings)
    return model


KnownModelDep = Annotated[str, Depends(known_model)]


async def known_version_model(request: Request, services: ServicesDep) -> None:
    """``known_model`` for ``POST /v1/predictions``, whose model is named by the body's
    ``version`` (``owner/name[:version]``): looked at in the JSON as sent, before the body
    is validated. Anything that is no such string is left to the validation."""
    try:
        body = await request.json()  # FastAPI parsed it already: starlette keeps the result
    except (ValueError, RecursionError):  # not JSON (or nested past parsing): for the validation to say
        return
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, str) and len(version) <= MAX_NAME_CHARS:
        version_of(version, services.settings)


def version_of(requested: str | None, settings: Settings) -> str:
    """What ``version`` records: a version id as given; ``owner/name[:version]`` must name
    this server's model."""
    if not requested:
        return MODEL_VERSION
    if "/" not in requested:
        return requested
    model, _, version = requested.partition(":")
    check_model(model, settings)
    return version or MODEL_VERSION


async def create(
    route: str,
    body: ReplicatePredictionRequest,
    key: ApiKey,
    presented: str | None,
    services: Services,
    base: str,
    idempotency_key: str | None,
    prefer: str | None,
) -> ReplicatePrediction:
    settings = services.settings
    wait = prefer_wait(prefer, settings)
    # The wait counts from the request's arrival: the client's read timeout is the wait
    # plus half a second, and fetching a reference image may take a while.
    started = time.monotonic()
    order = PredictionOrder(
        input=body.input,
        version=version_of(body.version, settings),
        webhook_url=body.webhook,
        # The key was checked by get_api_key already; the signing secret is derived from
        # it, and kept only where a webhook will need it.
        webhook_secret=signing_secret(presented) if body.webhook and presented else None,
        webhook_events=tuple(body.webhook_events_filter or WEBHOOK_EVENTS),
        webhook_field="webhook",
        surface=REPLICATE,
        base_url=base,
    )
    job = await create_once(
        services,
        key,
        idempotency_key,
        lambda: fingerprint(route, body.model_dump(mode="json")),
        lambda prediction_id: queue_job(order, key, services, prediction_id),
    )
    if wait is None:
        return render_replicate(job, base)
    job = await wait_after_create(services, job, max(0.0, wait - (time.monotonic() - started)))
    return render_replicate(job, base, waited_out=not job.is_terminal)


@router.post(
    "/v1/models/{owner}/{name}/predictions",
    response_model=ReplicatePrediction,
    status_code=201,
    summary="Create a prediction of a model (Replicate-compatible)",
)
async def create_model_prediction(
    key: ApiKeyDep,  # first: an unknown key is a 401 before anything else
    model: KnownModelDep,
    body: ReplicatePredictionRequest,
    presented: PresentedKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    idempotency_key: IdempotencyKeyHeader = None,
    prefer: PreferHeader = None,
) -> ReplicatePrediction:
    route = f"/v1/models/{model}/predictions"
    return await create(route, body, key, presented, services, base, idempotency_key, prefer)


@router.post(
    "/v1/predictions",
    response_model=ReplicatePrediction,
    status_code=201,
    summary="Create a prediction (Replicate-compatible)",
)
async def create_prediction(
    key: ApiKeyDep,  # first: an unknown key is a 401 before anything else
    _model: Annotated[None, Depends(known_version_model)],
    body: ReplicatePredictionRequest,
    presented: PresentedKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    idempotency_key: IdempotencyKeyHeader = None,
    prefer: PreferHeader = None,
) -> ReplicatePrediction:
    return await create("/v1/predictions", body, key, presented, services, base, idempotency_key, prefer)


@router.get(
    "/v1/predictions",
    response_model=ReplicatePredictionPage,
    summary="Your predictions, newest first (Replicate-compatible)",
)
async def list_predictions(
    key: ReaderKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    cursor: Annotated[str | None, Query(max_length=64, description="From the 'next' URL.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
) -> ReplicatePredictionPage:
    page, next_cursor = await page_of_jobs(services, key, limit, cursor)
    next_url = None
    if next_cursor is not None:
        next_url = f"{base}/v1/predictions?cursor={quote(next_cursor)}&limit={limit}"
    return ReplicatePredictionPage(results=[render_replicate(job, base) for job in page], next=next_url)


@router.get(
    "/v1/predictions/{prediction_id}",
    response_model=ReplicatePrediction,
    summary="Get a prediction (Replicate-compatible)",
)
async def get_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> ReplicatePrediction:
    job = await services.read(owned_job, services, prediction_id, key)
    return render_replicate(job, base)


@router.get(
    "/v1/predictions/{prediction_id}/stream",
    response_class=EventSourceResponse,
    summary="Follow a prediction as it runs (Replicate's Server-Sent Events: logs, output, error, done)",
    responses={200: {"content": {"text/event-stream": {}}}},
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


@router.post(
    "/v1/predictions/{prediction_id}/cancel",
    response_model=ReplicatePrediction,
    summary="Cancel a prediction (Replicate-compatible)",
)
async def cancel_prediction(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> ReplicatePrediction:
    return render_replicate(await cancel_owned(services, prediction_id, key), base)


@router.get(
    "/v1/webhooks/default/secret",
    response_model=WebhookSigningSecret,
    summary="The secret that signs your webhooks (Standard Webhooks)",
)
async def webhook_secret(key: ApiKeyDep, presented: PresentedKeyDep) -> WebhookSigningSecret:
    return WebhookSigningSecret(key=signing_secret(presented or ""))


# When this API's shape last changed: what a version's created_at says.
VERSION_CREATED_AT = "2026-12-01T00:00:00Z"


def describe_version(version_id: str) -> ReplicateVersion:
    return ReplicateVersion(
        id=version_id, created_at=VERSION_CREATED_AT, cog_version="fluxredux", openapi_schema=version_schema()
    )


@router.get(
    "/v1/models/{owner}/{name}",
    response_model=ReplicateModel,
    summary="The model this server runs (Replicate-compatible)",
)
async def get_model(
    owner: str, name: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> ReplicateModel:
    check_model(f"{owner}/{name}", services.settings)
    return ReplicateModel(
        url=f"{base}/v1/models/{owner}/{name}",
        owner=owner,
        name=name,
        description="FLUX.1 Redux [schnell] image variations, served by fluxredux",
        latest_version=describe_version(MODEL_VERSION),
    )


@router.get(
    "/v1/models/{owner}/{name}/versions/{version_id}",
    response_model=ReplicateVersion,
    summary="A version of the model (Replicate-compatible): every id names the one model served",
)
async def get_model_version(
    owner: str,
    name: str,
    version_id: Annotated[str, Path(max_length=128)],
    key: ReaderKeyDep,
    services: ServicesDep,
) -> ReplicateVersion:
    # Creates accept any version id (this server runs one model): so do reads, or the
    # official client, which reads the version after running a pinned "owner/name:version",
    # would fail after its prediction was made.
    check_model(f"{owner}/{name}", services.settings)
    return describe_version(version_id)
