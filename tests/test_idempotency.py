"""Idempotent creates: an ``Idempotency-Key`` makes a retried create answer with the
prediction the first one made (for 24 h), on both surfaces; the same key with another
request is a 409. The IdempotencyStore contract, run against SQLite and a real Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.access.idempotency import IdempotencyStore
from fluxredux.pipeline.fake import FakeModel
from tests.backends import Engine
from tests.harness import Harness, png_data_uri, running_server
from tests.helpers import FakeClock

MODEL = "black-forest-labs/flux-redux-schnell"
DAY = 24 * 3600.0

# --- the IdempotencyStore contract, run against every engine (tests/backends.py) ------------

SEAM = "idempotency"
Opener = Callable[[], IdempotencyStore]


@pytest.fixture
def open_store(engine: Engine) -> Opener:
    """Every handle a connection or client of its own (as another API node has), on one
    deployment's keys."""
    return engine.open


@pytest.fixture
def store(open_store: Opener) -> IdempotencyStore:
    return open_store()


def test_the_first_claim_wins_and_the_next_finds_it(store: IdempotencyStore, clock: FakeClock) -> None:
    first = store.claim("key-a", "k1", "fp1", "pred-1")
    assert first.won and first.record.prediction_id == "pred-1" and not first.record.completed
    assert first.abandoned is None
    assert (first.record.created_at, first.record.expires_at) == (clock.now, clock.now + DAY)
    again = store.claim("key-a", "k1", "fp2", "pred-2")
    assert not again.won and again.record.fingerprint == "fp1" and again.record.prediction_id == "pred-1"
    assert not again.record.completed

    assert store.complete(first.record)
    assert store.complete(first.record)  # a completion resent (its answer lost) is no harm
    found = store.claim("key-a", "k1", "fp1", "pred-3")
    assert not found.won and found.record.prediction_id == "pred-1" and found.record.completed
    got = store.get("key-a", "k1")
    assert got is not None and got.prediction_id == "pred-1"


def test_keys_are_scoped_per_api_key(store: IdempotencyStore) -> None:
    assert store.claim("key-a", "k1", "fp", "p1").won
    assert store.claim("key-b", "k1", "fp", "p2").won
    assert store.get("key-c", "k1") is None


def test_a_record_expires_after_its_ttl(store: IdempotencyStore, clock: FakeClock) -> None:
    first = store.claim("key-a", "k1", "fp1", "pred-1")
    store.complete(first.record)
    clock.now += DAY - 1
    assert store.get("key-a", "k1") is not None
    clock.now += 1
    assert store.get("key-a", "k1") is None
    fresh = store.claim("key-a", "k1", "fp2", "pred-2")  # a new request may use the key again
    assert fresh.won and fresh.record.fingerprint == "fp2" and fresh.abandoned is None


def test_a_claim_that_runs_out_unfinished_can_be_taken_over(
    store: IdempotencyStore, clock: FakeClock
) -> None:
    stale = store.claim("key-a", "k1", "fp1", "pred-stale", claim_seconds=60)
    clock.now += 59
    assert not store.claim("key-a", "k1", "fp1", "pred-x").won
    clock.now += 1
    taken = store.claim("key-a", "k1", "fp1", "pred-new")
    assert taken.won
    # The claim it replaced may have made its prediction: the new claimer is told of it,
    # and, for the same request, names that prediction again rather than its own.
    assert taken.abandoned is not None and taken.abandoned.prediction_id == "pred-stale"
    assert taken.record.prediction_id == "pred-stale"
    # The first claimer, back late, changes nothing: fenced by the claim's token.
    assert not store.complete(stale.record)
    assert not store.release(stale.record)
    assert store.complete(taken.record)
    found = store.get("key-a", "k1")
    assert found is not None and found.prediction_id == "pred-stale"


def test_claims_failing_in_a_row_name_the_first_ones_prediction(store: IdempotencyStore) -> None:
    """However many creates of the same request fail without knowing whether the first was
    made (its answer lost, then the look for it too), each names the same prediction: it
    can be made once only. Another request under the key names its own."""
    first = store.claim("key-a", "k1", "fp1", "pred-1")
    assert store.release(first.record)
    for attempt in range(2, 5):
        again = store.claim("key-a", "k1", "fp1", f"pred-{attempt}")
        assert again.won and again.record.prediction_id == "pred-1", attempt
        assert again.abandoned is not None and again.abandoned.prediction_id == "pred-1"
        assert store.release(again.record)
    other = store.claim("key-a", "k1", "fp-other", "pred-10")
    assert other.won and other.record.prediction_id == "pred-10"
    assert other.abandoned is not None and other.abandoned.prediction_id == "pred-1"


def test_release_frees_the_key_but_not_a_completed_one(store: IdempotencyStore) -> None:
    first = store.claim("key-a", "k1", "fp1", "pred-1")
    assert store.release(first.record)
    assert store.get("key-a", "k1") is None
    second = store.claim("key-a", "k1", "fp2", "pred-2")
    assert second.won
    # The released claim's prediction might exist (an insert whose answer was lost fails
    # too): the next claim is told of it.
    assert second.abandoned is not None
    assert (second.abandoned.prediction_id, second.abandoned.fingerprint) == ("pred-1", "fp1")
    assert store.complete(second.record)
    assert not store.release(second.record)  # it made a prediction: the key keeps it
    third = store.claim("key-a", "k1", "fp2", "pred-3")
    assert not third.won and third.record.prediction_id == "pred-2"


def test_a_claim_can_adopt_the_prediction_an_abandoned_claim_made(store: IdempotencyStore) -> None:
    lost = store.claim("key-a", "k1", "fp-first", "pred-first")
    store.release(lost.record)
    retry = store.claim("key-a", "k1", "fp-first", "pred-second")
    assert retry.won and retry.abandoned is not None
    assert store.complete(retry.record, retry.abandoned)
    found = store.get("key-a", "k1")
    assert found is not None and found.completed
    assert (found.prediction_id, found.fingerprint) == ("pred-first", "fp-first")


def test_concurrent_claims_from_many_handles_have_one_winner(open_store: Opener) -> None:
    handles = [open_store() for _ in range(8)]
    barrier = threading.Barrier(len(handles))

    def claim(pair: tuple[int, IdempotencyStore]) -> bool:
        barrier.wait()
        return pair[1].claim("key-a", "race", "fp", f"pred-{pair[0]}").won

    with ThreadPoolExecutor(len(handles)) as pool:
        results = list(pool.map(claim, enumerate(handles)))
    assert results.count(True) == 1


@pytest.mark.engines("redis")
def test_redis_records_leave_nothing_behind_but_their_hashes(engine: Engine) -> None:
    store = engine.open(clock=None)
    claimed = store.claim("key-a", "weird:key with spaces", "fp", "pred-1")
    assert claimed.won and store.get("key-a", "weird:key with spaces") is not None
    [name] = engine.redis_keys()
    assert 0 < engine.redis_client().ttl(name) <= DAY + 60  # Redis expires it too: nothing to sweep
    store.release(claimed.record)  # ended, kept for the next claim to learn of, still expiring
    assert engine.redis_keys() == [name] and 0 < engine.redis_client().ttl(name) <= DAY + 60
    assert store.get("key-a", "weird:key with spaces") is None


# --- over HTTP, on both surfaces -------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.05)) as harness:
        yield harness


def created_count(api: Harness) -> int:
    return sum(api.services.store.counts_by_status().values())


def eachlabs_create(api: Harness, key: str | None, **inputs: Any) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return api.http.post("/v1/prediction/", json=api.body(**inputs), headers=headers)


def replicate_create(api: Harness, key: str | None, **inputs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api.key}", **({"Idempotency-Key": key} if key else {})}
    body = {"input": {"redux_image": png_data_uri(), **inputs}}
    return httpx.post(f"{api.url}/v1/models/{MODEL}/predictions", json=body, headers=headers, timeout=30)


def test_eachlabs_a_retried_create_returns_the_same_prediction(api: Harness) -> None:
    first = eachlabs_create(api, "order-1", seed=1)
    retried = eachlabs_create(api, "order-1", seed=1)
    assert first.status_code == retried.status_code == 200
    assert first.json()["predictionID"] == retried.json()["predictionID"]
    assert created_count(api) == 1
    # The same input sent differently ("1" for 1) is the same request.
    as_strings = api.http.post(
        "/v1/prediction/",
        json=api.body(seed="1") | {"input": api.body(seed=1)["input"] | {"num_outputs": "1"}},
        headers={"Idempotency-Key": "order-1"},
    )
    assert as_strings.json()["predictionID"] == first.json()["predictionID"]
    # Without a key, every create is a new prediction, as before.
    assert eachlabs_create(api, None, seed=1).json()["predictionID"] != first.json()["predictionID"]


def test_eachlabs_the_same_key_with_another_body_is_a_409(api: Harness) -> None:
    assert eachlabs_create(api, "order-2", seed=1).status_code == 200
    conflict = eachlabs_create(api, "order-2", seed=2)
    assert conflict.status_code == 409
    error = conflict.json()
    assert error["code"] == "idempotency_key_reused" and error["header"] == "Idempotency-Key"
    assert "Idempotency-Key" in error["error"]
    # Another route is another request too: /run with the key of a create.
    run = api.http.post("/v1/prediction/run", json=api.body(seed=1), headers={"Idempotency-Key": "order-2"})
    assert run.status_code == 409
    assert created_count(api) == 1


def test_replicate_a_retried_create_returns_the_same_prediction(api: Harness) -> None:
    first = replicate_create(api, "order-3", seed=1)
    retried = replicate_create(api, "order-3", seed=1)
    assert first.status_code == retried.status_code == 201
    assert first.json()["id"] == retried.json()["id"]
    assert created_count(api) == 1
    conflict = replicate_create(api, "order-3", seed=2)
    assert conflict.status_code == 409
    problem = conflict.json()
    assert problem["status"] == 409 and problem["header"] == "Idempotency-Key"
    assert "Idempotency-Key" in problem["detail"] and problem["code"] == "idempotency_key_reused"


def test_keys_of_one_api_key_are_not_anothers(api: Harness) -> None:
    _key, other = api.services.keys.create("other")
    mine = eachlabs_create(api, "shared-name").json()["predictionID"]
    theirs = httpx.post(
        f"{api.url}/v1/prediction/",
        json=api.body(),
        headers={"X-API-Key": other, "Idempotency-Key": "shared-name"},
    ).json()["predictionID"]
    assert mine != theirs and created_count(api) == 2


def test_a_refused_create_does_not_use_up_the_key(api: Harness) -> None:
    refused = eachlabs_create(api, "order-4", redux_image="https://127.0.0.1/private.png")
    assert refused.status_code == 400
    # The corrected retry, under the same key, goes through.
    assert eachlabs_create(api, "order-4").status_code == 200
    assert created_count(api) == 1


def test_concurrent_identical_creates_make_one_prediction(api: Harness) -> None:
    def create(i: int) -> httpx.Response:
        return (eachlabs_create if i % 2 else replicate_create)(api, f"burst-{i % 2}", seed=5)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create, range(8)))
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers]
    eachlabs_ids = {a.json()["predictionID"] for a in answers if a.status_code == 200}
    replicate_ids = {a.json()["id"] for a in answers if a.status_code == 201}
    assert len(eachlabs_ids) == len(replicate_ids) == 1
    assert created_count(api) == 2


def test_run_with_a_key_retried_answers_the_finished_prediction(api: Harness) -> None:
    first = api.http.post("/v1/prediction/run", json=api.body(), headers={"Idempotency-Key": "run-1"}).json()
    assert first["status"] == "success"
    again = api.http.post("/v1/prediction/run", json=api.body(), headers={"Idempotency-Key": "run-1"}).json()
    assert again["id"] == first["id"] and again["output"] == first["output"]


def test_a_bad_key_is_named(api: Harness) -> None:
    too_long = eachlabs_create(api, "k" * 256)
    assert too_long.status_code == 400 and "Idempotency-Key" in too_long.json()["error"]
    blank = eachlabs_create(api, "key\x7f")  # not printable
    assert blank.status_code == 400 and blank.json()["header"] == "Idempotency-Key"
    assert created_count(api) == 0


def test_one_key_makes_one_prediction_across_api_nodes(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Scale-out: racing retries of one create land on different API nodes (real
    `fluxredux serve --redis` processes): one prediction, found through Redis by both."""
    from tests.cluster import cluster

    with cluster(tmp_path, redis_url, redis_prefix, f"file://{tmp_path}/shared") as deployment:
        nodes = [deployment.node("api-a"), deployment.node("api-b")]

        def create(i: int) -> httpx.Response:
            node = nodes[i % 2]
            headers = {**node.headers(), "Idempotency-Key": "across-nodes"}
            return httpx.post(
                f"{node.url}/v1/prediction/", json=node.body(seed=3), headers=headers, timeout=30
            )

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(create, range(6)))
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        [prediction_id] = {a.json()["predictionID"] for a in answers}
        assert nodes[1].get(prediction_id)["input"]["seed"] == 3

        other = nodes[1].body(seed=4)
        conflict = httpx.post(
            f"{nodes[1].url}/v1/prediction/",
            json=other,
            headers={**nodes[1].headers(), "Idempotency-Key": "across-nodes"},
            timeout=30,
        )
        assert conflict.status_code == 409 and conflict.json()["header"] == "Idempotency-Key"
        listed = httpx.get(f"{nodes[0].url}/v1/prediction/", headers=nodes[0].headers()).json()
        assert [p["id"] for p in listed["items"]] == [prediction_id]


class LosesTheFirstCreateAnswer(httpx.BaseTransport):
    """The network as it sometimes is: the first create reaches the server (which makes
    the prediction) but its answer never comes back."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/prediction/" and not self.lost:
            response.read()
            response.close()
            self.lost += 1
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response


def test_the_python_client_resends_a_keyed_create_whose_answer_was_lost(api: Harness) -> None:
    from fluxredux.client import FluxRedux

    with FluxRedux(api.url, api.key, transport=LosesTheFirstCreateAnswer()) as client:
        prediction_id = client.create({"redux_image": png_data_uri()}, idempotency_key="lost-answer")
    assert created_count(api) == 1  # the resend found the first create's prediction
    assert api.get(prediction_id)["id"] == prediction_id

    # Without a key, nothing can tell a resend from a new create: the loss is raised.
    with (
        FluxRedux(api.url, api.key, transport=LosesTheFirstCreateAnswer()) as client,
        pytest.raises(httpx.ReadError),
    ):
        client.create({"redux_image": png_data_uri()})
    assert created_count(api) == 2


# --- a create whose store answer is lost (a real Redis behind a link that loses it) ----------


def is_a_create(request: bytes) -> bool:
    """The job store's insert: its script's call, carrying the job's document."""
    return request.lstrip().startswith(b"*") and b"EVALSHA" in request and b'"progress_total"' in request


@pytest.fixture
def lossy_redis_api(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[tuple[Harness, Any]]:
    from urllib.parse import urlsplit

    from tests.lossy_link import lossy_link

    parts = urlsplit(redis_url)
    with lossy_link(parts.port or 6379) as link:
        url = f"redis://127.0.0.1:{link.port}{parts.path}"
        with running_server(tmp_path, run_worker=False, redis_url=url, redis_prefix=redis_prefix) as api:
            assert api.http.post("/v1/prediction/", json=api.body()).status_code == 200  # scripts loaded
            yield api, link


def is_a_job_read(request: bytes) -> bool:
    return b"GET" in request and b":job:" in request


def test_a_create_whose_answer_redis_loses_is_queued_once(lossy_redis_api: tuple[Harness, Any]) -> None:
    """The insert's answer is lost: the API node looks for the job before calling the
    create a failure, and finds it. One prediction, a 200, not a 503 for a queued job."""
    api, link = lossy_redis_api
    before = created_count(api)
    link.drop(lambda request: is_a_create(request) and not link.dropped)
    answer = eachlabs_create(api, None)
    assert link.dropped == 1
    assert answer.status_code == 200, answer.text
    assert created_count(api) == before + 1
    assert api.get(answer.json()["predictionID"])["status"] == "starting"


@pytest.mark.parametrize("then_lost", ["its check", "everything until healed"])
def test_a_keyed_create_whose_answer_redis_loses_is_found_by_its_retry(
    lossy_redis_api: tuple[Harness, Any], then_lost: str
) -> None:
    """The insert's answer lost, and the look for the job too (or every answer after it,
    the claim's release included): the create fails (503), though its job is stored. The
    client's retry with the same Idempotency-Key answers with that job: one prediction."""
    api, link = lossy_redis_api
    before = created_count(api)
    if then_lost == "its check":
        link.drop(lambda request: is_a_create(request) or is_a_job_read(request))
    else:
        link.drop(lambda request: is_a_create(request) or link.dropped > 0)
    failed = eachlabs_create(api, "lost-in-redis")
    assert failed.status_code == 503, failed.text
    link.drop(None)
    assert link.dropped >= 2 and created_count(api) == before + 1  # it was made, all the same
    retried = eachlabs_create(api, "lost-in-redis")
    assert retried.status_code == 200, retried.text
    assert created_count(api) == before + 1
    again = eachlabs_create(api, "lost-in-redis")
    assert again.json()["predictionID"] == retried.json()["predictionID"]
    # The failed create left the queued job its reference: a worker can run it.
    job = api.services.store.get(retried.json()["predictionID"])
    assert job is not None and job.input_files
    assert all(api.services.blobs.exists(name) for name in job.input_files)
