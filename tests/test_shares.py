"""Share links: made on purpose by the owner, found by their own token, revocable.

A prediction id is no secret (logs, webhooks, client code carry it), so it must open
nothing by itself; on a real server with the fake model (flat colours, no torch).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.access.shares import MAX_SHARES_PER_PREDICTION, ShareStore
from fluxredux.api.maintenance import delete_expired
from fluxredux.errors import TooManyShares
from tests.backends import Engine
from tests.harness import Harness, running_server
from tests.helpers import run_threads

SEAM = "shares"  # the ShareStore contract below runs on each engine of it


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path) as harness:
        yield harness


@pytest.fixture
def other(api: Harness) -> Iterator[httpx.Client]:
    """A client with another valid key of the same server."""
    _key, secret = api.services.keys.create("someone else")
    with httpx.Client(base_url=api.url, headers={"X-API-Key": secret}, timeout=30) as client:
        yield client


def done(api: Harness, **inputs: Any) -> dict[str, Any]:
    prediction = api.get(api.create_id(**inputs), wait=10)
    assert prediction["status"] == "success"
    return prediction


def share(api: Harness, prediction_id: str, **body: Any) -> dict[str, Any]:
    response = api.http.post(f"/v1/prediction/{prediction_id}/share", json=body or None)
    assert response.status_code == 200, response.text
    return dict(response.json())


def public(api: Harness, token: str) -> httpx.Response:
    return httpx.get(f"{api.url}/v1/share/{token}")  # no key


def test_a_share_made_by_the_owner_opens_without_a_key(api: Harness) -> None:
    prediction = done(api, num_outputs=2, seed=7)
    made = share(api, prediction["id"])
    token = made["token"]
    assert token != prediction["id"] and len(token) >= 22
    assert made["url"] == f"{api.url}/p/{token}"
    assert made["prediction_id"] == prediction["id"] and made["include_reference"] is False
    assert made["created_at"].endswith("Z")

    response = public(api, token)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"  # a revoked link must not live on in caches
    shown = response.json()
    assert shown["status"] == "success"
    assert shown["output"] == prediction["output"]
    assert shown["seed"] == 7 and shown["demo"] is True
    assert shown["input"]["num_outputs"] == 2
    assert shown["metrics"]["total_time"] == prediction["metrics"]["total_time"]
    assert shown["created_at"] == prediction["created_at"]
    assert shown["completed_at"] == prediction["completed_at"]
    assert prediction["id"] not in response.text
    assert not {"id", "logs", "urls", "error_code"} & set(shown)
    assert all(httpx.get(url).status_code == 200 for url in shown["output"])

    page = httpx.get(made["url"])
    assert page.status_code == 200 and "share.js" in page.text


def test_a_bare_prediction_id_opens_nothing(api: Harness) -> None:
    prediction = done(api)
    for _ in range(2):
        assert public(api, prediction["id"]).status_code == 404
        assert httpx.get(f"{api.url}/p/{prediction['id']}").status_code == 404
        share(api, prediction["id"])  # even a shared prediction is not found by its id
    assert public(api, "not-a-token").status_code == 404


def test_the_prediction_no_longer_links_to_a_share_page(api: Harness) -> None:
    assert set(done(api)["urls"]) == {"get", "cancel", "stream"}


def test_the_reference_image_is_shared_only_when_included(api: Harness) -> None:
    prediction = done(api)
    reference = prediction["input"]["redux_image"]
    hidden = public(api, share(api, prediction["id"])["token"])
    assert "redux_image" not in hidden.json()["input"]
    assert reference not in hidden.text

    included = share(api, prediction["id"], include_reference=True)
    assert included["include_reference"] is True
    shown = public(api, included["token"]).json()
    assert shown["input"]["redux_image"] == reference
    assert httpx.get(shown["input"]["redux_image"]).status_code == 200


def test_the_share_body_is_optional_and_strict(api: Harness) -> None:
    prediction_id = done(api)["id"]
    bare = api.http.post(f"/v1/prediction/{prediction_id}/share")
    assert bare.status_code == 200 and bare.json()["include_reference"] is False
    unknown = api.http.post(f"/v1/prediction/{prediction_id}/share", json={"public": True})
    assert unknown.status_code == 400 and "unknown field 'public'" in unknown.json()["error"]
    no_key = httpx.post(f"{api.url}/v1/prediction/{prediction_id}/share")
    assert no_key.status_code == 401


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None])
def test_include_reference_is_a_json_boolean(api: Harness, value: object) -> None:
    """A string or a number is no boolean: "yes" or 1 must not share the reference image."""
    prediction_id = done(api)["id"]
    refused = api.http.post(f"/v1/prediction/{prediction_id}/share", json={"include_reference": value})
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "invalid_input"
    assert [f["field"] for f in refused.json()["fields"]] == ["include_reference"]
    assert api.http.get(f"/v1/prediction/{prediction_id}/shares").json() == {"items": []}


def test_the_owner_lists_active_shares(api: Harness) -> None:
    prediction_id = done(api)["id"]
    assert api.http.get(f"/v1/prediction/{prediction_id}/shares").json() == {"items": []}
    first = share(api, prediction_id)
    second = share(api, prediction_id, include_reference=True)
    listed = api.http.get(f"/v1/prediction/{prediction_id}/shares").json()["items"]
    assert listed == [first, second]


def test_another_key_cannot_create_list_or_revoke_my_shares(api: Harness, other: httpx.Client) -> None:
    prediction_id = done(api)["id"]
    mine = share(api, prediction_id)
    created = other.post(f"/v1/prediction/{prediction_id}/share", json={})
    listed = other.get(f"/v1/prediction/{prediction_id}/shares")
    revoked = other.delete(f"/v1/share/{mine['token']}")
    for response in (created, listed, revoked):
        assert response.status_code == 404, response.text
    # Exactly the answer for a prediction that does not exist: nothing tells that it does.
    absent = other.post("/v1/prediction/AAAAAAAAAAAAAAAAAAAAAA/share", json={})
    assert created.json()["code"] == absent.json()["code"] == "not_found"
    assert public(api, mine["token"]).status_code == 200
    assert [s["token"] for s in api.http.get(f"/v1/prediction/{prediction_id}/shares").json()["items"]] == [
        mine["token"]
    ]


def test_revoking_closes_the_link_and_the_page(api: Harness) -> None:
    prediction_id = done(api)["id"]
    kept = share(api, prediction_id)
    gone = share(api, prediction_id)
    response = api.http.delete(f"/v1/share/{gone['token']}")
    assert response.status_code == 204 and response.content == b""
    assert public(api, gone["token"]).status_code == 404
    assert httpx.get(gone["url"]).status_code == 404
    assert api.http.delete(f"/v1/share/{gone['token']}").status_code == 404  # only once
    assert public(api, kept["token"]).status_code == 200  # the other link is untouched
    listed = api.http.get(f"/v1/prediction/{prediction_id}/shares").json()["items"]
    assert [s["token"] for s in listed] == [kept["token"]]


def test_a_prediction_has_at_most_ten_live_share_links(api: Harness) -> None:
    prediction_id = done(api)["id"]
    made = [share(api, prediction_id) for _ in range(10)]
    refused = api.http.post(f"/v1/prediction/{prediction_id}/share", json={})
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "too_many_shares" and refused.json()["limit"] == 10
    assert "10" in refused.json()["error"] and "revoke" in refused.json()["error"]
    assert len(api.http.get(f"/v1/prediction/{prediction_id}/shares").json()["items"]) == 10
    assert share(api, done(api)["id"])["token"]  # the cap is per prediction
    assert api.http.delete(f"/v1/share/{made[3]['token']}").status_code == 204  # revoking frees a slot
    share(api, prediction_id)
    assert api.http.post(f"/v1/prediction/{prediction_id}/share").status_code == 409


def test_retention_deletes_the_shares_with_their_predictions(api: Harness) -> None:
    prediction_id = done(api)["id"]
    made = share(api, prediction_id)
    week_later = time.time() + api.services.settings.retention_hours * 3600 + 60
    assert delete_expired(api.services, now=week_later) == 1
    assert api.services.shares.get(made["token"]) is None
    assert api.services.shares.list_for_prediction(prediction_id) == []
    assert public(api, made["token"]).status_code == 404
    assert httpx.get(made["url"]).status_code == 404


# --- the ShareStore contract, run against every engine (tests/backends.py) ------------------


@pytest.fixture
def share_store(engine: Engine) -> ShareStore:
    return engine.open()


def test_share_store_contract_create_get_list(share_store: ShareStore) -> None:
    before = time.time()
    a = share_store.create("p1", "key-a")
    b = share_store.create("p1", "key-a", include_reference=True)
    c = share_store.create("p2", "key-b")
    assert len({a.token, b.token, c.token}) == 3 and len(a.token) > 22
    prediction_id = "JQ8TSpuOoJ3sKBtv7iLb4g"  # one of real length: "p1" turns up in ~1% of tokens
    assert prediction_id not in share_store.create(prediction_id, "key-a").token  # nothing derived from it
    assert (a.prediction_id, a.owner, a.include_reference) == ("p1", "key-a", False)
    assert b.include_reference and (c.prediction_id, c.owner) == ("p2", "key-b")
    assert before - 5 <= a.created_at <= b.created_at <= c.created_at <= time.time() + 5
    assert share_store.get(a.token) == a and share_store.get(b.token) == b and share_store.get(c.token) == c
    for unknown in ("p1", "", "nope", "a:b", "token:" + a.token):  # found by its own token only
        assert share_store.get(unknown) is None
    assert share_store.list_for_prediction("p1") == [a, b]  # oldest first
    assert share_store.list_for_prediction("p2") == [c]
    assert share_store.list_for_prediction("p3") == []


def test_share_store_contract_revoke_only_by_owner(share_store: ShareStore) -> None:
    a = share_store.create("p1", "key-a")
    b = share_store.create("p1", "key-a")
    assert share_store.revoke(a.token, "key-b") is False  # not theirs
    assert share_store.get(a.token) == a
    assert share_store.revoke(a.token, "key-a") is True
    assert share_store.revoke(a.token, "key-a") is False  # once
    assert share_store.revoke("nope", "key-a") is False
    assert share_store.get(a.token) is None
    assert share_store.list_for_prediction("p1") == [b]


def test_share_store_contract_a_share_is_revoked_once_under_concurrent_revokes(
    share_store: ShareStore,
) -> None:
    made = share_store.create("p1", "key-a")
    results: list[bool] = []
    run_threads([lambda: results.append(share_store.revoke(made.token, "key-a"))] * 8)
    assert sorted(results) == [False] * 7 + [True]


def test_share_store_contract_live_shares_per_prediction_are_capped(share_store: ShareStore) -> None:
    made = [share_store.create("p1", "key-a", limit=3) for _ in range(3)]
    with pytest.raises(TooManyShares) as refused:
        share_store.create("p1", "key-a", limit=3)
    assert refused.value.detail["limit"] == 3 and refused.value.code == "too_many_shares"
    assert share_store.list_for_prediction("p1") == made  # the refused one left nothing behind
    assert share_store.create("p2", "key-a", limit=3).prediction_id == "p2"  # per prediction
    assert share_store.revoke(made[0].token, "key-a")  # revoking frees a slot
    again = share_store.create("p1", "key-a", limit=3)
    assert share_store.list_for_prediction("p1") == [*made[1:], again]
    with pytest.raises(TooManyShares):
        share_store.create("p1", "key-a", limit=3)
    assert len([share_store.create("p3", "key-a") for _ in range(MAX_SHARES_PER_PREDICTION)]) == 10
    with pytest.raises(TooManyShares):  # the default cap
        share_store.create("p3", "key-a")


def test_share_store_contract_concurrent_creates_never_pass_the_cap(share_store: ShareStore) -> None:
    made: list[object] = []
    refused: list[TooManyShares] = []

    def create() -> None:
        try:
            made.append(share_store.create("p1", "key-a", limit=5))
        except TooManyShares as exc:
            refused.append(exc)

    run_threads([create] * 12)
    assert (len(made), len(refused)) == (5, 7)
    assert len(share_store.list_for_prediction("p1")) == 5


def test_share_store_contract_delete_for_predictions(share_store: ShareStore) -> None:
    kept = share_store.create("p-kept", "key-a")
    share_store.create("p1", "key-a")
    share_store.create("p1", "key-b")
    share_store.create("p2", "key-a")
    assert share_store.delete_for_predictions(["p1", "p2", "p3"]) == 3
    assert share_store.list_for_prediction("p1") == share_store.list_for_prediction("p2") == []
    assert share_store.delete_for_predictions(["p1"]) == 0
    assert share_store.delete_for_predictions([]) == 0
    assert share_store.get(kept.token) == kept and share_store.list_for_prediction("p-kept") == [kept]


def test_share_store_contract_delete_for_many_predictions_at_once(share_store: ShareStore) -> None:
    """Retention deletes thousands of predictions in one round (in batches, in any store)."""
    made = [share_store.create(f"p{i}", "key-a") for i in range(1100)]
    ids = (f"p{i}" for i in range(1, 1100))  # any iterable, not only a list
    assert share_store.delete_for_predictions(ids) == 1099
    assert share_store.get(made[0].token) == made[0] and share_store.get(made[-1].token) is None


@pytest.mark.engines("redis")
def test_redis_share_store_leaves_nothing_behind(engine: Engine, share_store: ShareStore) -> None:
    """Revoked and deleted shares take their index entries with them."""
    a = share_store.create("p1", "key-a")
    share_store.create("p1", "key-a")
    share_store.create("p2", "key-a")
    assert share_store.revoke(a.token, "key-a")
    share_store.delete_for_predictions(["p1", "p2"])
    assert engine.redis_keys() == []
