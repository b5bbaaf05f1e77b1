"""The scale-out job store: jobs in Redis, shared by every API node and GPU worker.

Each job is one JSON document (a string key), and every query the protocol needs is
answered from sorted sets kept beside it. Every write changes the document and its index
entries in one MULTI/EXEC, after WATCHing what it read (optimistic compare-and-set,
retried on conflict), so the indexes never disagree with the documents a reader can see
and two writers (threads, API nodes, workers) never lose each other's changes. The one
exception is ``create_if_under_capacity``: a Lua script (count and insert, run alone by
Redis), because a WATCH on the queue would be broken by every other create and claim.

Keys, under ``prefix`` (one deployment or test per prefix)::

    job:{id}                       the job, JSON (the same fields as the SQLite ``data`` column)
    created                        zset: every job,            scored by created_at
    status:{status}                zset: the jobs in a status, scored by created_at
    owner:{owner}                  zset: an owner's jobs,      scored by created_at
    owner-status:{status}:{owner}  zset: an owner's jobs in a status (in-flight counts)
    lease                          zset: jobs holding a lease, scored by lease_expires_at
    webhook:{state}                zset: jobs by webhook state, scored by created_at
    completed                      zset: finished jobs,        scored by completed_at
    write-probe                    the readiness probe's scratch key

Ties in a sorted set are ordered by member, i.e. by job id: exactly the contract's
(created_at, id) order. The owner is the last part of its keys, so no owner name (colons
included) can make two keys collide.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis

from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import ClientOrUrl, Clock, RedisSeam
from fluxredux.errors import StoreUnavailable
from fluxredux.jobs.job import IN_FLIGHT, Job, Status, job_from_json, job_to_json
from fluxredux.jobs.store import CLAIM_WINDOW, Capacity, Change, same_create
from fluxredux.jobs.transitions import start_attempt

# A compare-and-set that keeps losing is retried this often before the store reports itself
# unavailable: conflicts resolve within a few rounds (every round, some writer wins), so
# only a pathological hot spot ever gets here.
# How long a write keeps redoing rounds lost to concurrent writers before a 503.
CONFLICT_BUDGET_SECONDS = 2.0
# At most this many ids are read from a lease or completion range by one ``find``.
RANGE_CAP = 20_000
# How many ids a paged index scan reads per round trip.
_PAGE = 200

# KEYS: the owner's two in-flight sets, the queue's set, the job's key, then its index keys.
# ARGV: per-owner limit, queue limit, job id, document, then one score per index key.
# Returns {in_flight, queued, outcome}: 1 inserted, 0 refused (a limit), 2 this job was
# stored by an earlier attempt (its id, owner and creation time), -1 another job has the id.
# The id is looked at first: an attempt that is resent after its answer was lost must find
# its own job, not count it against the limits and be refused.
_CREATE_IF_UNDER_CAPACITY = """
local in_flight = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local queued = redis.call('ZCARD', KEYS[3])
local stored = redis.call('GET', KEYS[4])
if stored then
    local was, now = cjson.decode(stored), cjson.decode(ARGV[4])
    if was.owner == now.owner and was.created_at == now.created_at then
        return {in_flight, queued, 2}
    end
    return {in_flight, queued, -1}
end
if in_flight >= tonumber(ARGV[1]) or queued >= tonumber(ARGV[2]) then
    return {in_flight, queued, 0}
end
redis.call('SET', KEYS[4], ARGV[4])
for i = 5, #KEYS do
    redis.call('ZADD', KEYS[i], ARGV[i], ARGV[3])
end
return {in_flight, queued, 1}
"""

Entries = dict[str, float]  # index key -> score of one job's entry in it


def _matches(
    job: Job,
    wanted: set[Status] | None,
    lease_expired_at: float | None,
    webhook_state: str | None,
    completed_before: float | None,
) -> bool:
    """The ``find`` filters, checked on the document itself: index reads and document reads
    are separate round trips, so the document (not the index) has the last word."""
    return (
        (wanted is None or job.status in wanted)
        and (
            lease_expired_at is None
            or (job.lease_expires_at is not None and job.lease_expires_at <= lease_expired_at)
        )
        and (webhook_state is None or job.webhook_state == webhook_state)
        and (
            completed_before is None or (job.completed_at is not None and job.completed_at < completed_before)
        )
    )


class RedisJobStore(RedisSeam):
    def __init__(
        self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:", clock: Clock | None = None
    ) -> None:
        # The client is Any at this boundary (see ``open_client``); every value read from it
        # is converted (str/int/float) where it enters our types. The clock is Redis's TIME
        # by default: the one clock every node and worker agrees on for leases.
        super().__init__(url_or_client, clock)
        self._prefix = f"{prefix}jobs:"
        self._create_script = self._script(_CREATE_IF_UNDER_CAPACITY)

    # --- keys and index entries --------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _status_key(self, status: Status) -> str:
        return f"{self._prefix}status:{status.value}"

    def _owner_key(self, owner: str) -> str:
        return f"{self._prefix}owner:{owner}"

    def _owner_status_key(self, status: Status, owner: str) -> str:
        return f"{self._prefix}owner-status:{status.value}:{owner}"

    def _webhook_key(self, state: str) -> str:
        return f"{self._prefix}webhook:{state}"

    @property
    def _created_key(self) -> str:
        return f"{self._prefix}created"

    @property
    def _lease_key(self) -> str:
        return f"{self._prefix}lease"

    @property
    def _completed_key(self) -> str:
        return f"{self._prefix}completed"

    def _entries(self, job: Job) -> Entries:
        """Every index entry ``job`` has: the one definition inserts, updates and deletes share."""
        entries = {
            self._created_key: job.created_at,
            self._status_key(job.status): job.created_at,
            self._owner_key(job.owner): job.created_at,
            self._owner_status_key(job.status, job.owner): job.created_at,
        }
        if job.lease_expires_at is not None:
            entries[self._lease_key] = job.lease_expires_at
        if job.webhook_state is not None:
            entries[self._webhook_key(job.webhook_state)] = job.created_at
        if job.completed_at is not None:
            entries[self._completed_key] = job.completed_at
        return entries

    def _queue_write(self, pipe: Any, job_id: str, old: Job | None, new: Job | None) -> None:
        """Queue (inside MULTI) the document write and the index diff from ``old`` to ``new``
        (None: absent), so a job and its index entries always change together."""
        before = self._entries(old) if old is not None else {}
        after = self._entries(new) if new is not None else {}
        if new is None:
            pipe.delete(self._job_key(job_id))
        else:
            pipe.set(self._job_key(job_id), job_to_json(new))
        for key in before.keys() - after.keys():
            pipe.zrem(key, job_id)
        for key, score in after.items():
            if before.get(key) != score:
                pipe.zadd(key, {job_id: score})

    # --- optimistic transactions -------------------------------------------------------

    def _transact(self, what: str, attempt: Callable[[Any], Any]) -> Any:
        """Run ``attempt(pipe)`` (WATCH, read, MULTI, queue writes; EXEC happens here when
        it opened a MULTI) until no watched key changed in between."""
        deadline = time.monotonic() + CONFLICT_BUDGET_SECONDS
        with redis_errors(what):
            retry = 0
            while time.monotonic() < deadline:
                retry += 1
                with self._redis.pipeline(transaction=True) as pipe:
                    try:
                        result = attempt(pipe)
                        if pipe.explicit_transaction:
                            pipe.execute()
                        return result
                    except redis.WatchError:
                        # Someone else's write won this round: read again and redo. A short
                        # random pause once it keeps happening spreads a herd of writers out.
                        if retry >= 3:
                            time.sleep(random.uniform(0, 0.002 * min(retry, 10)))
        raise StoreUnavailable(f"the job store is too contended to {what} right now; retry shortly")

    # --- the protocol ------------------------------------------------------------------

    def insert(self, job: Job) -> None:
        def attempt(pipe: Any) -> None:
            pipe.watch(self._job_key(job.id))
            if pipe.exists(self._job_key(job.id)):
                raise KeyError(f"job {job.id} exists")
            pipe.multi()
            self._queue_write(pipe, job.id, None, job)

        self._transact("written", attempt)

    def create_if_under_capacity(self, job: Job, per_owner_limit: int, queue_limit: int) -> Capacity:
        # Count and insert in one Lua script: Redis runs it alone, so the limits hold across
        # API nodes, in one round trip that never retries. (A WATCH on the queue's set would
        # be broken by every create and claim anywhere: under load, creates would spend
        # their time redoing rounds.) The index entries still come from ``_entries``, the
        # one definition every write uses; the script only writes what it is given.
        entries = self._entries(job)
        keys = [
            *(self._owner_status_key(status, job.owner) for status in sorted(IN_FLIGHT)),
            self._status_key(Status.STARTING),
            self._job_key(job.id),
            *entries,
        ]
        args: list[str | int] = [per_owner_limit, queue_limit, job.id, job_to_json(job)]
        args += [repr(score) for score in entries.values()]
        try:
            with redis_errors("written"):
                in_flight, queued, outcome = (int(n) for n in self._create_script(keys=keys, args=args))
        except StoreUnavailable:
            # The script may have run and only its answer been lost (the connection cut or
            # timed out once the call was sent): look, once, before calling it a failure. A
            # job that is there was queued (the counts are not known: only a refusal uses them).
            stored = self.get(job.id)
            if stored is None or not same_create(stored, job):
                raise
            return Capacity(in_flight=0, queued=0, accepted=True)
        if outcome < 0:
            raise KeyError(f"job {job.id} exists")
        return Capacity(in_flight=in_flight, queued=queued, accepted=outcome >= 1)

    def get(self, job_id: str) -> Job | None:
        with redis_errors("read"):
            data = self._redis.get(self._job_key(job_id))
        return job_from_json(data) if data is not None else None

    def update(self, job_id: str, change: Change) -> Job | None:
        def attempt(pipe: Any) -> Job | None:
            pipe.watch(self._job_key(job_id))
            data = pipe.get(self._job_key(job_id))
            if data is None:
                return None
            # ``change`` gets its own copy: it may mutate its argument, and the old job is
            # still needed to diff the indexes.
            updated = change(job_from_json(data))
            if updated is None:
                return None
            pipe.multi()
            self._queue_write(pipe, job_id, job_from_json(data), updated)
            return updated

        result: Job | None = self._transact("written", attempt)
        return result

    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        queue_key = self._status_key(Status.STARTING)

        def attempt(pipe: Any) -> Job | None:
            # Look at the head of the queue without watching it, and WATCH only the job we
            # try: a create or another worker's claim elsewhere in the queue does not undo
            # this round, and the job's own status is the fence (two workers can never
            # both move it out of STARTING).
            with redis_errors("read"):
                head = [str(job_id) for job_id in self._redis.zrange(queue_key, 0, CLAIM_WINDOW - 1)]
            for job_id in head:
                pipe.watch(self._job_key(job_id))
                data = pipe.get(self._job_key(job_id))
                if data is None:
                    # A queue entry without its job (evicted, deleted by hand): drop it, or
                    # every claim would stop at it for good.
                    pipe.unwatch()
                    with redis_errors("written"):
                        self._redis.zrem(queue_key, job_id)
                    continue
                current = job_from_json(data)
                if current.status != Status.STARTING:  # taken meanwhile: try the next one
                    pipe.unwatch()
                    continue
                # The one transition function, applied inside the WATCH (the same claim as
                # every other backend's), stamped now rather than before any retries.
                claimed = start_attempt(job_from_json(data), worker_id, self.now(), lease_seconds)
                pipe.multi()
                self._queue_write(pipe, job_id, current, claimed)
                return claimed
            if head:
                raise redis.WatchError("every job looked at was taken meanwhile")
            return None

        result: Job | None = self._transact("written", attempt)
        return result

    def queue_position(self, job_id: str) -> int | None:
        with redis_errors("read"):
            rank = self._redis.zrank(self._status_key(Status.STARTING), job_id)
        return int(rank) if rank is not None else None

    def _load(self, job_ids: list[str]) -> list[Job]:
        """The documents of ``job_ids``, in that order; ids deleted meanwhile are skipped."""
        if not job_ids:
            return []
        with redis_errors("read"):
            documents = self._redis.mget([self._job_key(job_id) for job_id in job_ids])
        return [job_from_json(data) for data in documents if data is not None]

    def list_by_owner(self, owner: str, limit: int, before: float | None = None) -> list[Job]:
        if limit <= 0:
            return []
        upper = f"({before}" if before is not None else "+inf"  # "(": strictly before
        with redis_errors("read"):
            # REV also reverses ties (by id): (created_at DESC, id DESC), as the contract says.
            ids = self._redis.zrevrangebyscore(self._owner_key(owner), upper, "-inf", start=0, num=limit)
        return self._load([str(job_id) for job_id in ids])

    def _scan(self, key: str) -> Iterator[tuple[float, str]]:
        """(created_at, id) of one created_at-scored index, oldest first, a page at a time."""
        start = 0
        while True:
            with redis_errors("read"):
                page = self._redis.zrange(key, start, start + _PAGE - 1, withscores=True)
            for job_id, score in page:
                yield float(score), str(job_id)
            if len(page) < _PAGE:
                return
            start += _PAGE

    def _range_candidates(self, lease_expired_at: float | None, completed_before: float | None) -> list[str]:
        """Ids in the lease and/or completed ranges asked for, in (created_at, id) order."""
        found: set[str] | None = None
        with redis_errors("read"):
            # Capped: after a long outage a retention range may hold millions of ids; the
            # earliest ones come first, and the next round takes the rest.
            if lease_expired_at is not None:
                found = {
                    str(i)
                    for i in self._redis.zrangebyscore(
                        self._lease_key, "-inf", lease_expired_at, start=0, num=RANGE_CAP
                    )
                }
            if completed_before is not None:
                done = {
                    str(i)
                    for i in self._redis.zrangebyscore(
                        self._completed_key, "-inf", f"({completed_before}", start=0, num=RANGE_CAP
                    )
                }
                found = done if found is None else found & done
            ids = sorted(found or ())
            created = self._redis.zmscore(self._created_key, ids) if ids else []
        # A job deleted between the two reads has no created_at any more: drop it.
        return [
            job_id
            for _, job_id in sorted((float(c), i) for c, i in zip(created, ids, strict=True) if c is not None)
        ]

    def find(
        self,
        statuses: Iterable[Status] | None = None,
        *,
        lease_expired_at: float | None = None,
        webhook_state: str | None = None,
        completed_before: float | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        wanted = set(statuses) if statuses is not None else None
        if limit <= 0 or wanted == set():
            return []
        # Drive the search from the most selective index, then check every filter on the
        # documents: the lease and completed ranges (few ids: expired leases, a retention
        # window), else the webhook state's set, else the wanted statuses' sets merged in
        # order, else every job.
        candidates: Iterator[str]
        if lease_expired_at is not None or completed_before is not None:
            candidates = iter(self._range_candidates(lease_expired_at, completed_before))
        elif webhook_state is not None:
            candidates = (job_id for _, job_id in self._scan(self._webhook_key(webhook_state)))
        elif wanted is not None:
            merged = heapq.merge(*(self._scan(self._status_key(s)) for s in sorted(wanted)))
            candidates = (job_id for _, job_id in merged)
        else:
            candidates = (job_id for _, job_id in self._scan(self._created_key))

        found: list[Job] = []
        seen: set[str] = set()  # a job that moved between pages of a scan comes once
        while len(found) < limit:
            taken = _take(candidates, min(_PAGE, 2 * (limit - len(found))))
            if not taken:
                break
            batch = [job_id for job_id in taken if job_id not in seen]
            seen.update(batch)
            found += [
                job
                for job in self._load(batch)
                if _matches(job, wanted, lease_expired_at, webhook_state, completed_before)
            ]
        return found[:limit]

    def count(self, statuses: Iterable[Status], owner: str | None = None) -> int:
        keys = [
            self._status_key(s) if owner is None else self._owner_status_key(s, owner) for s in set(statuses)
        ]
        if not keys:
            return 0
        with redis_errors("read"), self._redis.pipeline(transaction=True) as pipe:
            for key in keys:  # one MULTI: the counts of one moment, not of several
                pipe.zcard(key)
            return sum(int(n) for n in pipe.execute())

    def counts_by_status(self) -> dict[Status, int]:
        with redis_errors("read"), self._redis.pipeline(transaction=True) as pipe:
            for status in Status:
                pipe.zcard(self._status_key(status))
            return {status: int(n) for status, n in zip(Status, pipe.execute(), strict=True)}

    def delete(self, job_ids: Iterable[str]) -> None:
        ids = list(dict.fromkeys(job_ids))
        for start in range(0, len(ids), _PAGE):
            chunk = ids[start : start + _PAGE]

            def attempt(pipe: Any, chunk: list[str] = chunk) -> None:
                keys = [self._job_key(job_id) for job_id in chunk]
                pipe.watch(*keys)
                documents = pipe.mget(keys)
                pipe.multi()
                for job_id, data in zip(chunk, documents, strict=True):
                    if data is not None:  # the document and every index entry it had
                        self._queue_write(pipe, job_id, job_from_json(data), None)

            self._transact("written", attempt)

    def check_writable(self) -> None:
        # A real write: a read-only replica, a full disk (AOF) or maxmemory refuses it.
        with redis_errors("written"):
            self._redis.set(f"{self._prefix}write-probe", repr(time.time()))

    def close(self) -> None:
        with redis_errors("closed"):
            super().close()


def _take(items: Iterator[str], n: int) -> list[str]:
    taken: list[str] = []
    for item in items:
        taken.append(item)
        if len(taken) >= n:
            break
    return taken
