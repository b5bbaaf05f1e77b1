"""Share links: the owner creates, lists and revokes them; anyone with a link reads a reduced view.

A prediction id is no secret (it is in logs, webhooks, client code), so nothing here is
found by it without the owner's key: the public read takes a share token only.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fluxredux.access.shares import MAX_SHARES_PER_PREDICTION, Share
from fluxredux.api.deps import BaseUrlDep, ReaderKeyDep, ServicesDep
from fluxredux.api.eachlabs.render import render
from fluxredux.api.eachlabs.shapes import PredictionMetrics, PublicStatus
from fluxredux.api.errors import error_responses
from fluxredux.api.prediction_actions import owned_job
from fluxredux.api.services import Services
from fluxredux.errors import NotFound
from fluxredux.jobs.job import Job

router = APIRouter(tags=["shares"], responses=error_responses(400, 401, 404, 413, 429, 503))


class ShareRequest(BaseModel):
    """Body of ``POST /v1/prediction/{id}/share`` (optional: an empty body takes the defaults)."""

    model_config = ConfigDict(extra="forbid")

    # JSON true/false only: lax parsing would read "yes", "no", 1 or 0 as a boolean, and
    # whether the reference image is shown must never rest on a guess.
    include_reference: StrictBool = Field(
        False, description="Show the reference image on the shared page too (off: only the outputs)."
    )


class ShareLink(BaseModel):
    token: str = Field(description="The share's own random token: the link's capability.")
    url: str = Field(description="The page anyone with the link can open, without a key.")
    prediction_id: str
    include_reference: bool
    created_at: str


class ShareList(BaseModel):
    items: list[ShareLink]


class SharedPrediction(BaseModel):
    """What a share link shows: results and settings; no id, logs, links or webhook."""

    status: PublicStatus
    input: dict[str, Any] = Field(
        description="The settings used, those given as none left out (no prompt, a random seed: "
        "the seed used is `seed`); redux_image only when the sharer included the reference."
    )
    output: str | list[str] | None = None
    error: str | None = None
    seed: int | None = None
    metrics: PredictionMetrics
    demo: bool = False
    created_at: str
    completed_at: str | None = None


def _link(share: Share, base: str) -> ShareLink:
    return ShareLink(
        token=share.token,
        url=f"{base}/p/{share.token}",
        prediction_id=share.prediction_id,
        include_reference=share.include_reference,
        created_at=datetime.fromtimestamp(share.created_at, tz=timezone.utc)
        .isoformat()
        .replace("+00:00", "Z"),
    )


def shared_job(services: Services, token: str) -> tuple[Share, Job]:
    """The share and its prediction, or NotFound (revoked, expired and never-made alike)."""
    share = services.shares.get(token)
    job = services.store.get(share.prediction_id) if share else None
    if share is None or job is None or job.owner != share.owner:
        raise NotFound("no shared result with this link: it was never made, was revoked or has expired")
    return share, job


def public_view(share: Share, job: Job, base: str) -> SharedPrediction:
    full = render(job, base)  # the same output and reference URLs as the owner sees
    # A field recorded as none was not given (no prompt; a seed left random, whose value
    # used is ``seed``): there is no setting to show.
    shown_input = {name: value for name, value in full.input.items() if value is not None}
    if not share.include_reference:
        shown_input.pop("redux_image", None)
        shown_input.pop("redux_images", None)
    if isinstance(source := shown_input.get("upscale_from"), dict):
        # A share never names a prediction: of a final's draft, only which output it was.
        shown_input["upscale_from"] = {"index": source.get("index", 0)}
    return SharedPrediction(
        status=full.status,
        input=shown_input,
        output=full.output,
        error=full.error,
        seed=full.seed,
        metrics=full.metrics,
        demo=full.demo,
        created_at=full.created_at,
        completed_at=full.completed_at,
    )


@router.post("/v1/prediction/{prediction_id}/share", response_model=ShareLink, responses=error_responses(409),
             summary="Share one of your predictions: a new link that opens without a key (at most "
             f"{MAX_SHARES_PER_PREDICTION} live links per prediction)")  # fmt: skip
async def create_share(
    prediction_id: str,
    key: ReaderKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    body: Annotated[ShareRequest | None, Body()] = None,
) -> ShareLink:
    body = body or ShareRequest()
    # SQLite calls block: off the event loop, so one slow disk never stalls every request.
    # The store caps a prediction's live links (TooManyShares) in one step with the insert.
    await services.read(owned_job, services, prediction_id, key)
    share = await asyncio.to_thread(
        services.shares.create, prediction_id, key.id, include_reference=body.include_reference
    )
    return _link(share, base)


@router.get("/v1/prediction/{prediction_id}/shares", response_model=ShareList,
            summary="The active share links of one of your predictions")  # fmt: skip
async def list_shares(
    prediction_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep
) -> ShareList:
    await services.read(owned_job, services, prediction_id, key)
    shares = await asyncio.to_thread(services.shares.list_for_prediction, prediction_id)
    return ShareList(items=[_link(share, base) for share in shares if share.owner == key.id])


@router.delete("/v1/share/{token}", status_code=204, response_class=Response,
               summary="Stop sharing: the link opens nothing from now on")  # fmt: skip
async def revoke_share(token: str, key: ReaderKeyDep, services: ServicesDep) -> Response:
    # Another key's share is as good as absent, exactly like another key's prediction.
    if not await asyncio.to_thread(services.shares.revoke, token, key.id):
        raise NotFound("no share with this token among yours")
    return Response(status_code=204)


@router.get("/v1/share/{token}", response_model=SharedPrediction,
            summary="A shared result, without a key (the share token is the capability)")  # fmt: skip
async def shared_prediction(
    token: str, services: ServicesDep, base: BaseUrlDep, response: Response
) -> SharedPrediction:
    share, job = await asyncio.to_thread(shared_job, services, token)
    # A revoked link must stop working at once, in browsers and proxies alike.
    response.headers["Cache-Control"] = "no-store"
    return public_view(share, job, base)
