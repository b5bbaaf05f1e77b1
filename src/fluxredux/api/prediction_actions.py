"""What both API surfaces do to predictions (Eachlabs' /v1/prediction and Replicate's
/v1/predictions are thin translations over these): queue a job after every check, find
the caller's own, wait for one to end, page through them, cancel one.

Each takes the caller's key and the services; none knows either surface's shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluxredux.access.keys import ApiKey
from fluxredux.api.drafts import checked_size, draft_of, files_gone, final_from
from fluxredux.api.inputs import (
    StoredImage,
    copy_images,
    download_references,
    needs_download,
    recorded_input,
    store_references,
)
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
)
from fluxredux.jobs.job import EACHLABS, Job, Surface, WebhookEvent
from fluxredux.jobs.store import Capacity
from fluxredux.net import check_url_shape
from fluxredux.schema import MODEL_VERSION, PredictionInput, refine_steps
from fluxredux.storage import BlobNotFound

# A long-poll re-reads its job this often even without a wake-up.
LONG_POLL_RECHECK_SECONDS = 5.0


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
        async with asyncio.timeout(timeout):
            await services.fetcher.checked_address(check_url_shape(url))
    except FetchRefused as exc:
        raise FetchRefused(exc.code, f"{field}: {exc.message}", field=field) from None
    except TimeoutError:
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
    webhook_events: tuple[WebhookEvent, ...] = ("completed",)
    webhook_field: str = "webhook_url"  # how the request names the webhook (in errors)
    surface: Surface = EACHLABS
    # This server's base URL: a reference linking to one of its own uploads is used as
    # that upload (the Replicate client passes uploads by their URL), not fetched.
    base_url: str | None = None


def check_previews(workers: dict[str, Any]) -> None:
    """``preview: true`` where the ready workers make no previews (their TAEF1 weights are
    missing) is the caller's 400, naming the field, rather than a prediction that quietly
    shows none. With no worker ready yet there is no telling: accepted."""
    if workers.get("ready") and not workers.get("previews"):
        message = (
            "this server's workers make no step previews (their TAEF1 weights are missing: the "
            "operator runs fluxredux download --previews); leave preview out"
        )
        raise InvalidInput(
            f"input.preview: {message}",
            fields=[{"field": "input.preview", "message": message, "type": "previews_unavailable"}],
            field="input.preview",
        )


async def queue_job(order: PredictionOrder, key: ApiKey, services: Services, prediction_id: str) -> Job:
    """Validate everything, check limits, store the reference images, queue the job as
    ``prediction_id`` (named by the caller: see fluxredux.api.idempotent.create_once).

    The store's work is done in as few thread hops as the order allows (each hop off the
    event loop costs as much as the work, on the path of every create): one for the usual
    create (references inline or uploaded, no webhook); a webhook's check and a URL's
    download wait on the network, on the loop, between the early refusal and the rest."""

    refusal = services.workers.refusal()
    if refusal is not None:  # accepting work that no worker can run would only hide the problem
        raise refusal
    if order.input.preview:
        check_previews(services.workers.status())
    own_files = f"{order.base_url.rstrip('/')}/files/" if order.base_url else None
    if not order.webhook_url and not needs_download(order.input, own_files):
        job = await asyncio.to_thread(_accept, services, key, order, prediction_id, own_files)
        return await _after_queued(services, job)
    # Refuse early, before fetching anything; the insert checks again. With Redis,
    # counting is a network call: never on the event loop.
    await asyncio.to_thread(_admit, services, key, count=not order.webhook_url)
    if order.webhook_url:  # checked before the create counts against the key's rate
        await check_webhook_target(services, order.webhook_url, order.webhook_field)
        await asyncio.to_thread(services.creations.hit, key.id, "prediction creations")
    downloaded = await download_references(order.input, services.fetcher, own_files)
    job = await asyncio.to_thread(_accept, services, key, order, prediction_id, own_files, downloaded)
    return await _after_queued(services, job)


async def _after_queued(services: Services, job: Job) -> Job:

    await services.webhooks.queued(job)  # its start event, when its receiver asked for it
    return job


def _accept(
    services: Services,
    key: ApiKey,
    order: PredictionOrder,
    prediction_id: str,
    own_files: str | None,
    downloaded: dict[int, bytes] | None = None,
) -> Job:
    """A create's store work, blocking (in one thread): without ``downloaded``, first the
    early refusal and the create counted (``_admit``); then the references stored and the
    job queued, unless a limit is reached (then the copies made for it are deleted)."""
    if downloaded is None:
        _admit(services, key, count=True)
    if order.input.loras:  # before anything is stored: an unknown adapter is a 400 now, not a failed run
        services.loras.check(order.input.loras)
    inputs, stored = _store_inputs(services, key, order, own_files, downloaded)
    job = Job(
        id=prediction_id,
        owner=key.id,
        input=recorded_input(inputs, stored[: len(inputs.references)]),
        created_at=0.0,  # stamped by the store's clock as it is queued (_insert)
        version=order.version,
        webhook_url=order.webhook_url,
        webhook_secret=order.webhook_secret,
        webhook_events=list(order.webhook_events),
        surface=order.surface,
        input_files=[image.name for image in stored],
        progress_total=_steps(inputs, stored),
    )
    copies = [image.name for image in stored if image.saved_now]
    try:
        capacity = _insert(services, job)
    except KeyError:
        # Its id is taken: an earlier create under the same Idempotency-Key named it and
        # was queued after all (its answer lost). That job is the answer; these copies go.
        services.blobs.delete(copies)
        return _made_already(services, key, job.id)
    except StoreUnavailable as exc:
        # The insert's answer may be what was lost, with the job queued: its files stay
        # unless the job is surely not there (a retry under its key finds the job, which
        # needs them; without a key, it runs, and the worker finds it by its poll).
        try:
            found = services.store.get(job.id)
        except StoreUnavailable:
            raise exc from None
        if found is None:
            services.blobs.delete(copies)
            raise
        return found
    if not capacity.accepted:
        services.blobs.delete(copies)  # refused: the copies made for this request go (an upload stays)
        full = QueueFull("the server's queue is full; try again")
        raise capacity_error(services.settings, capacity) or full
    return job


def _made_already(services: Services, key: ApiKey, prediction_id: str) -> Job:
    found = services.store.get(prediction_id)
    if found is None or found.owner != key.id:  # ids are random: never another's, but say so
        raise StoreUnavailable(f"prediction {prediction_id} was made and is gone; retry the create")
    return found


def _store_inputs(
    services: Services,
    key: ApiKey,
    order: PredictionOrder,
    own_files: str | None,
    downloaded: dict[int, bytes] | None,
) -> tuple[PredictionInput, list[StoredImage]]:
    """The input to record and its stored images, in order: the references; for a final
    (``upscale_from``), its draft's (copied) unless the request gives its own, then the
    draft's chosen output (copied, always last). Blocking: in ``_accept``'s thread."""
    limits = services.decode_limits

    def references(inputs: PredictionInput) -> list[StoredImage]:
        return store_references(
            inputs, key.id, services.blobs, services.uploads, limits, own_files, downloaded
        )

    if order.input.upscale_from is None:
        return order.input, references(order.input)
    draft = draft_of(services.store, key.id, order.input)
    final = final_from(draft, order.input)
    own = references(final.input) if final.own_references else []
    try:
        copies = copy_images(final.files, services.blobs, limits)
    except BaseException as exc:
        services.blobs.delete([image.name for image in own if image.saved_now])
        if isinstance(exc, BlobNotFound):
            raise files_gone(draft) from None
        raise
    stored = own + copies
    try:
        checked_size(final.input, (copies[-1].width, copies[-1].height))
    except InvalidInput:
        services.blobs.delete([image.name for image in stored if image.saved_now])
        raise
    return final.input, stored


def _steps(inputs: PredictionInput, stored: list[StoredImage]) -> int:
    """The denoising steps the job will report: a final's refine runs only its share."""
    if inputs.upscale_from is None or inputs.upscale_strength >= 1:
        return inputs.num_inference_steps
    return refine_steps(inputs.num_inference_steps, inputs.upscale_strength)


def _admit(services: Services, key: ApiKey, *, count: bool) -> None:
    """The early refusal (the key's predictions in flight, the queue's depth); then, with
    ``count``, the create counted against the key's rate limit. Blocking: in a thread."""
    early = Capacity(
        in_flight=services.lifecycle.in_flight(key.id),
        queued=services.lifecycle.queue_depth(),
        accepted=False,
    )
    if (error := capacity_error(services.settings, early)) is not None:
        raise error
    if count:
        services.creations.hit(key.id, "prediction creations")


def _insert(services: Services, job: Job) -> Capacity:
    """Stamp ``job`` with the store's clock, not this node's (queue order and paging must
    not depend on which API node took the request), and queue it unless a limit is reached:
    counted and inserted in one store operation, so concurrent creations (of this process
    or another) cannot push a key over its in-flight limit or the queue over its cap.
    Blocking: in a thread; it also wakes a worker (``wake`` is thread-safe)."""
    settings = services.settings
    job.created_at = services.store.now()
    capacity = services.lifecycle.create_if_under_capacity(
        job, settings.max_in_flight_per_key, settings.max_queue
    )
    if capacity.accepted:
        services.workers.wake()  # from here: the worker need not wait for the event loop's turn
    return capacity


async def wait_until_done(
    services: Services, job_id: str, timeout: float, check: Callable[[Job | None], Job | None] | None = None
) -> Job | None:
    """Long-poll: woken by the job's end, not by re-reading on a timer.

    Only a terminal event wakes the poll (the steps in between would each cost a read for
    nothing); it carries the ended job, so the poll answers without a read (a wake-up
    without it, e.g. the timer's, reads the job: that read is shared with whoever else
    reads the job at that moment, the other polls of the job, the app's listener).
    ``check`` (on the loop) sees each job, read or carried: ``owned`` makes a GET's first
    read its ownership check too, one read instead of two."""
    deadline = time.monotonic() + timeout
    waiter = services.notifier.subscribe(job_id)
    try:
        while True:
            # Taken before reading: a change that lands after the read still wakes us. An
            # end's event carries the job as it ended: then no read at all.
            ended = waiter.take()

            job = ended or await services.job_reads.get(job_id, after=time.monotonic())

            if check is not None:
                job = check(job)
            remaining = deadline - time.monotonic()
            if job is None or job.is_terminal or remaining <= 0:
                return job
            # Re-read now and then even without a wake-up: a lost message (a bus reconnecting,
            # a worker on another machine) costs latency, never the answer. asyncio.timeout,
            # not wait_for, so that a shutdown's cancel always ends the poll (gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, LONG_POLL_RECHECK_SECONDS)):
                    await waiter.wait()
    finally:
        services.notifier.unsubscribe(job_id, waiter)


def owned(job: Job | None, job_id: str, key: ApiKey) -> Job:
    """``job`` if it is the caller's; NotFound otherwise (absent, or another key's)."""
    if job is None or job.owner != key.id:  # another key's prediction is as good as absent
        raise NotFound(f"no prediction with id '{job_id}'", id=job_id)
    return job


def owned_job(services: Services, job_id: str, key: ApiKey) -> Job:
    """The caller's job (blocking: call it through ``Services.read``)."""
    return owned(services.store.get(job_id), job_id, key)


async def wait_after_create(services: Services, job: Job, timeout: float) -> Job:
    """The job once it ended, or as it is after ``timeout`` s; a store that cannot be read
    meanwhile gives the job as created (accepted all the same: a retry must not duplicate it)."""
    if job.is_terminal:
        return job
    try:
        return await wait_until_done(services, job.id, timeout) or job
    except StoreUnavailable:
        return job


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
    jobs = await services.read(services.store.list_by_owner, key.id, limit + 1, before)
    page = jobs[:limit]
    return page, repr(page[-1].created_at) if len(jobs) > limit else None


async def cancel_owned(services: Services, prediction_id: str, key: ApiKey) -> Job:
    """Cancel the caller's prediction (idempotent); the job as it is after."""
    await services.read(owned_job, services, prediction_id, key)
    job = await asyncio.to_thread(services.lifecycle.cancel, prediction_id)
    if job is None:
        raise NotFound(f"no prediction with id '{prediction_id}'", id=prediction_id)
    return job
