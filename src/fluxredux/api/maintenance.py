"""Housekeeping beside the API: recover the jobs of gone workers, put webhooks of ended
jobs into the outbox (its sweeper sends them), and delete what is past retention.

Retention decides from stored records only (a prediction's completion time, an upload's
last use), never from file times: a blob store spread over machines has no trustworthy
file times, and a shared upload must outlive the first prediction that expires.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fluxredux.api.services import Services
from fluxredux.errors import StoreUnavailable
from fluxredux.jobs.registry import recover_orphans
from fluxredux.storage import BlobStoreError

log = logging.getLogger(__name__)

RETENTION_INTERVAL_SECONDS = 600.0  # deleting is cheap but need not be prompt


async def run_maintenance(services: Services) -> None:
    """Runs until cancelled; one failing round is logged and the next one tries again."""
    settings = services.settings
    retention_due = 0.0  # monotonic; the first round deletes what expired while the server was down
    while True:
        try:
            await asyncio.to_thread(
                recover_orphans,
                services.lifecycle,
                services.registry,
                max_attempts=settings.max_attempts,
                ttl=settings.worker_ttl_seconds,
            )
            await services.webhooks.enqueue_pending()  # e.g. a job that ended while the store was down
            if time.monotonic() >= retention_due:
                retention_due = time.monotonic() + RETENTION_INTERVAL_SECONDS
                await asyncio.to_thread(delete_expired, services)
        except StoreUnavailable as exc:  # expected while the store is down: one line, no trace
            log.warning("maintenance skipped this round: %s", exc.message)
            retention_due = 0.0  # an outage, not a bug: what it stopped is tried again next round
        except BlobStoreError as exc:
            # A missing bucket, denied access, a full disk, an endpoint down: someone has to
            # act, and the line says on what; a stack trace would say nothing more, every round.
            log.warning("%s (retention skipped: tried again next round)", exc.for_operator)
            retention_due = 0.0
        except Exception:
            log.exception("maintenance failed")  # a bug: retention not retried before its interval
        await asyncio.sleep(min(10.0, settings.lease_seconds / 3))


def delete_expired(services: Services, now: float | None = None) -> int:
    """Delete finished predictions older than the retention, with their share links, their
    outputs and their own input copies; then uploads unused for as long. How many
    predictions went.

    An upload a prediction used is never deleted with it: other predictions may use it
    too, and it is kept by its own last use."""
    # Completion times are stamped by the store's clock: compare with the same clock.
    cutoff = (services.store.now() if now is None else now) - services.settings.retention_hours * 3600
    expired = services.store.find(completed_before=cutoff, limit=10_000)
    inputs = [key for job in expired for key in job.input_files]
    shared = services.uploads.uploaded(inputs)
    # Files before records: if deleting files fails, the records stay and the next round
    # tries again, rather than leaving files that nothing refers to.
    services.blobs.delete([*(key for job in expired for key in job.output), *set(inputs) - shared])
    services.shares.delete_for_predictions(job.id for job in expired)  # their links die with them
    services.store.delete(job.id for job in expired)

    unused = services.uploads.expire(unused_since=cutoff)  # from now on, not found by id
    services.blobs.delete(upload.key for upload in unused)
    services.uploads.forget(upload.id for upload in unused)
    orphans = delete_orphan_blobs(services, cutoff - services.settings.retention_hours * 3600)
    if expired or unused or orphans:
        log.info(
            "retention: deleted %d predictions, %d uploads and %d orphaned files",
            len(expired),
            len(unused),
            orphans,
        )
    return len(expired)


def delete_orphan_blobs(services: Services, created_before: float) -> int:
    """Delete blobs no record refers to: outputs written by a worker that died before it
    could record them, the image copy of a create whose process died before its insert.

    Only blobs older than twice the retention are looked at (normally none: files are
    deleted with their records), and each is kept if any record still refers to it: a
    prediction (of any status) or an upload (kept by its own last use)."""
    old = [blob.key for blob in services.blobs.list() if blob.created_at < created_before]
    if not old:
        return 0
    jobs = services.store.find(limit=10_000_000)
    keep = services.uploads.uploaded(old) | {key for job in jobs for key in [*job.output, *job.input_files]}
    orphans = [key for key in old if key not in keep]
    services.blobs.delete(orphans)
    return len(orphans)
