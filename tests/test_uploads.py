"""Uploads have records and a retention of their own (bug 3: a shared upload was deleted
when the first prediction that used it expired), and retention decides from records,
never from file times."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.access.uploads import Upload, UploadStore
from fluxredux.api.maintenance import delete_expired
from tests.backends import Engine
from tests.harness import Harness, png_data_uri, running_server
from tests.helpers import run_threads

SEAM = "uploads"  # the UploadStore contract below runs on each engine of it


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path) as harness:
        yield harness


def upload(api: Harness) -> dict[str, str]:
    png = base64.b64decode(png_data_uri().split(",")[1])
    response = api.http.post("/v1/files", files={"file": ("ref.png", png, "image/png")})
    assert response.status_code == 200, response.text
    return dict(response.json())


def create_from(api: Harness, redux_image: str) -> httpx.Response:
    return api.http.post("/v1/prediction/", json=api.body() | {"input": {"redux_image": redux_image}})


def run_from(api: Harness, redux_image: str) -> dict[str, Any]:
    created = create_from(api, redux_image)
    assert created.status_code == 200, created.text
    prediction = api.get(created.json()["predictionID"], wait=10)
    assert prediction["status"] == "success", prediction
    return prediction


def retention(api: Harness) -> float:
    return api.services.settings.retention_hours * 3600


def test_a_shared_upload_outlives_the_first_prediction_that_expires(api: Harness) -> None:
    uploaded = upload(api)
    first = run_from(api, uploaded["id"])
    first_done = api.services.store.get(str(first["id"]))
    assert first_done is not None and first_done.completed_at is not None
    time.sleep(0.2)  # the second use comes measurably later
    second = run_from(api, uploaded["id"])
    assert second["input"]["redux_image"] == uploaded["url"]

    # Retention runs just after the first is past its time, the second not yet.
    assert delete_expired(api.services, now=first_done.completed_at + retention(api) + 0.1) == 1
    assert api.http.get(f"/v1/prediction/{first['id']}").status_code == 404
    assert httpx.get(str(first["output"])).status_code == 404  # its outputs went with it
    assert api.get(str(second["id"]))["status"] == "success"
    assert httpx.get(str(second["output"])).status_code == 200
    assert httpx.get(uploaded["url"]).status_code == 200  # the second's input is still there
    run_from(api, uploaded["id"])  # and the upload id still works


def test_an_upload_unused_for_the_retention_period_is_deleted(api: Harness) -> None:
    uploaded = upload(api)
    prediction = run_from(api, uploaded["id"])
    later = time.time() + retention(api) + 60
    assert delete_expired(api.services, now=later) == 1
    assert httpx.get(uploaded["url"]).status_code == 404
    assert api.services.uploads.get(uploaded["id"]) is None
    refused = create_from(api, uploaded["id"])
    assert refused.status_code == 404 and refused.json()["code"] == "image_file_not_found"
    assert httpx.get(str(prediction["output"])).status_code == 404


def test_using_an_upload_keeps_it(api: Harness) -> None:
    uploaded = upload(api)
    record = api.services.uploads.get(uploaded["id"])
    assert record is not None and record.last_used_at == record.created_at
    time.sleep(0.05)
    run_from(api, uploaded["id"])
    used = api.services.uploads.get(uploaded["id"])
    assert used is not None and used.last_used_at > record.last_used_at
    # Past the upload's own time, not past its last use: kept.
    delete_expired(api.services, now=(record.created_at + used.last_used_at) / 2 + retention(api))
    assert httpx.get(uploaded["url"]).status_code == 200


def test_retention_ignores_file_times(api: Harness) -> None:
    """A file written long ago (by its mtime) but recently used stays; only records count."""
    uploaded = upload(api)
    prediction = run_from(api, png_data_uri())  # its own input copy, and an output
    long_ago = time.time() - 10 * retention(api)
    for path in api.services.settings.files_dir.iterdir():
        os.utime(path, (long_ago, long_ago))
    assert delete_expired(api.services) == 0
    assert httpx.get(uploaded["url"]).status_code == 200
    assert httpx.get(str(prediction["output"])).status_code == 200
    assert httpx.get(str(prediction["input"]["redux_image"])).status_code == 200


def test_only_uploads_are_found_by_id(api: Harness) -> None:
    """An output's or another prediction's input file is no upload, whatever its name."""
    prediction = run_from(api, png_data_uri())
    for url in (str(prediction["output"]), str(prediction["input"]["redux_image"])):
        file_id = url.rsplit("/", 1)[1].split(".")[0]
        refused = create_from(api, file_id)
        assert refused.status_code == 404 and refused.json()["code"] == "image_file_not_found", url


def test_another_keys_upload_id_is_refused_at_create_as_an_unknown_one(api: Harness) -> None:
    """GET and DELETE /v1/files/{id} hide another key's upload (404); so does a create
    naming its id, on both surfaces: a 404 naming the field, exactly as for an id never
    uploaded (and the upload is not kept alive by the attempt)."""
    uploaded = upload(api)
    before = api.services.uploads.get(uploaded["id"])
    _key, secret = api.services.keys.create("someone else")
    unknown = "AAAAAAAAAAAAAAAAAAAAAA"
    eachlabs = httpx.Client(base_url=api.url, headers={"X-API-Key": secret}, timeout=30)
    replicate = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    with eachlabs, replicate:
        assert replicate.get(f"/v1/files/{uploaded['id']}").status_code == 404
        for file_id in (uploaded["id"], unknown):
            one = eachlabs.post("/v1/prediction/", json=api.body() | {"input": {"redux_image": file_id}})
            assert one.status_code == 404, one.text
            assert (one.json()["code"], one.json()["field"]) == ("image_file_not_found", "input.redux_image")
            several = {"redux_images": [{"image": png_data_uri()}, {"image": file_id}]}
            two = eachlabs.post("/v1/prediction/", json=api.body() | {"input": several})
            assert two.status_code == 404, two.text
            assert (two.json()["code"], two.json()["field"]) == (
                "image_file_not_found",
                "input.redux_images.1.image",
            )
            problem = replicate.post("/v1/predictions", json={"input": {"redux_image": file_id}})
            assert problem.status_code == 404, problem.text
            assert (problem.json()["code"], problem.json()["field"]) == (
                "image_file_not_found",
                "input.redux_image",
            )
            assert file_id in problem.json()["detail"]
    assert sum(api.services.store.counts_by_status().values()) == 0  # nothing was queued
    assert api.services.uploads.get(uploaded["id"]) == before  # nor the upload kept alive
    run_from(api, uploaded["id"])  # its owner still uses it


def test_another_keys_upload_url_is_copied_not_linked(api: Harness) -> None:
    """The file's URL is a capability (it downloads without a key), so it may be used as
    such, but as a copy of the prediction's own: never the upload itself, whose owner
    alone decides when it goes."""
    uploaded = upload(api)
    _key, secret = api.services.keys.create("someone else")
    with httpx.Client(base_url=api.url, headers={"X-API-Key": secret}, timeout=30) as other:
        created = other.post("/v1/prediction/", json=api.body() | {"input": {"redux_image": uploaded["url"]}})
    assert created.status_code == 200, created.text
    job = api.services.store.get(created.json()["predictionID"])
    assert job is not None and job.input_files and uploaded["id"] not in job.input_files[0]
    mine = create_from(api, uploaded["url"])  # the owner's own link is its upload, used in place
    own_job = api.services.store.get(mine.json()["predictionID"])
    assert own_job is not None and own_job.input_files[0].startswith(uploaded["id"])


# --- the UploadStore contract, run against every engine (tests/backends.py) -----------------


@pytest.fixture
def upload_store(engine: Engine) -> UploadStore:
    return engine.open(clock=None)  # the contract's times are the store's own, or given


def key_of(i: int, ext: str = "png") -> str:
    """A blob key shaped like a stored file's (22-character id, extension)."""
    return f"{i:022d}.{ext}"


def test_upload_store_contract_add_get_use(upload_store: UploadStore) -> None:
    a = upload_store.add("AAAAAAAAAAAAAAAAAAAAAA.png", "key-a", now=100.0)
    assert (a.id, a.key, a.owner, a.created_at, a.last_used_at) == (
        "AAAAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAA.png",
        "key-a",
        100.0,
        100.0,
    )
    assert upload_store.get(a.id) == a and upload_store.get("CCCCCCCCCCCCCCCCCCCCCC") is None
    assert upload_store.get(a.key) is None  # found by id, not by file name
    used = upload_store.use(a.id, now=300.5)
    assert used is not None and used.last_used_at == 300.5 and used.created_at == 100.0
    assert upload_store.use(a.id, now=250.0) == used  # never moves back
    assert upload_store.get(a.id) == used
    assert upload_store.use("nope") is None and upload_store.use("") is None
    with pytest.raises(ValueError, match="already"):  # never overwrites the first record
        upload_store.add("AAAAAAAAAAAAAAAAAAAAAA.png", "key-b", now=400.0)
    with pytest.raises(ValueError, match="already"):
        upload_store.add("AAAAAAAAAAAAAAAAAAAAAA.jpg", "key-b", now=400.0)  # the same id
    assert upload_store.get(a.id) == used


def test_upload_store_contract_times_default_to_the_store_clock(upload_store: UploadStore) -> None:
    before = time.time()
    made = upload_store.add(key_of(1), "key-a")
    assert before - 5 <= made.created_at == made.last_used_at <= time.time() + 5
    used = upload_store.use(made.id)
    assert used is not None and made.last_used_at <= used.last_used_at <= time.time() + 5


def test_upload_store_contract_uploaded(upload_store: UploadStore) -> None:
    a = upload_store.add(key_of(1), "key-a", now=100.0)
    b = upload_store.add(key_of(2, "jpg"), "key-b", now=200.0)
    assert upload_store.uploaded([a.key, b.key, key_of(3)]) == {a.key, b.key}
    assert upload_store.uploaded([a.id, key_of(2, "png")]) == set()  # blob keys, exactly
    assert upload_store.uploaded([]) == set()
    assert upload_store.uploaded(key_of(i) for i in range(2, 2000)) == set()  # batched
    assert upload_store.uploaded(iter([key_of(i, "jpg") for i in range(2000)])) == {b.key}


def test_upload_store_contract_expire_and_forget(upload_store: UploadStore) -> None:
    a = upload_store.add("AAAAAAAAAAAAAAAAAAAAAA.png", "key-a", now=100.0)
    b = upload_store.add("BBBBBBBBBBBBBBBBBBBBBB.jpg", "key-b", now=200.0)
    upload_store.use(a.id, now=300.0)
    expired = upload_store.expire(unused_since=250.0)
    assert expired == [b]
    assert upload_store.get(b.id) is None and upload_store.use(b.id) is None  # no longer found...
    assert upload_store.uploaded([b.key]) == {b.key}  # ...but still known until forgotten
    assert upload_store.expire(unused_since=250.0) == [b]  # not forgotten: again
    assert upload_store.forget([b.id, a.id, "nope"]) == 1  # only expired records go
    assert upload_store.forget([b.id]) == 0
    assert upload_store.expire(unused_since=250.0) == []
    assert upload_store.get(a.id) is not None and upload_store.uploaded([b.key]) == set()
    assert upload_store.expire(unused_since=300.0) == []  # last used at 300: not before it


def test_upload_store_contract_withdraw_one(upload_store: UploadStore) -> None:
    """An owner's delete: that upload alone is expired at once, then forgotten."""
    a = upload_store.add("AAAAAAAAAAAAAAAAAAAAAA.png", "key-a", now=100.0)
    b = upload_store.add("BBBBBBBBBBBBBBBBBBBBBB.jpg", "key-a", now=200.0)
    assert upload_store.withdraw(a.id) == a
    assert upload_store.get(a.id) is None and upload_store.use(a.id) is None
    assert upload_store.withdraw(a.id) is None and upload_store.withdraw("nope") is None
    assert upload_store.get(b.id) == b
    assert upload_store.uploaded([a.key]) == {a.key}  # known until forgotten
    # A failed blob deletion is finished by retention: the record is found marked.
    assert upload_store.expire(unused_since=0.0) == [a]
    assert upload_store.forget([a.id]) == 1
    assert upload_store.uploaded([a.key]) == set() and upload_store.expire(unused_since=0.0) == []


def test_upload_store_contract_expire_oldest_use_first_up_to_limit(upload_store: UploadStore) -> None:
    made = [upload_store.add(key_of(i), "key-a", now=t) for i, t in enumerate([500.0, 100.0, 400.0, 200.0])]
    bumped = upload_store.use(made[1].id, now=300.0)  # now the third oldest
    assert bumped is not None
    oldest_first = [made[3], bumped, made[2], made[0]]
    assert upload_store.expire(unused_since=1000.0, limit=2) == oldest_first[:2]
    assert all(upload_store.get(u.id) is None for u in made)  # every one is marked, not only two
    assert upload_store.expire(unused_since=1000.0, limit=10) == oldest_first
    assert upload_store.forget([made[3].id, bumped.id]) == 2
    assert upload_store.expire(unused_since=0.0, limit=10) == oldest_first[2:]


def test_upload_store_contract_expires_many_at_once(upload_store: UploadStore) -> None:
    """A long backlog (more than any one batch) expires and goes in one retention round."""
    made = [upload_store.add(key_of(i), "key-a", now=1000.0 + i) for i in range(1200)]
    expired = upload_store.expire(unused_since=5000.0)
    assert expired == made
    assert upload_store.forget(u.id for u in expired) == 1200
    assert upload_store.uploaded(u.key for u in made) == set()


def test_upload_store_contract_use_and_expire_never_interleave(upload_store: UploadStore) -> None:
    """Every upload is either used (and kept) or expired (and refused), never both: a
    create that has just used an upload never has its blob deleted under it."""
    made = [upload_store.add(key_of(i), "key-a", now=100.0) for i in range(300)]
    used: list[Upload] = []
    expired: list[Upload] = []

    def use(part: list[Upload]) -> None:
        for upload in part:
            if (found := upload_store.use(upload.id, now=300.0)) is not None:
                used.append(found)

    users = [lambda part=made[i::3]: use(part) for i in range(3)]
    run_threads([*users, lambda: expired.extend(upload_store.expire(unused_since=250.0))])
    used_ids, expired_ids = {u.id for u in used}, {u.id for u in expired}
    assert not used_ids & expired_ids
    assert used_ids | expired_ids == {u.id for u in made}
    assert all(u.last_used_at == 300.0 and upload_store.get(u.id) == u for u in used)


@pytest.mark.engines("redis")
def test_redis_upload_store_uses_the_injected_clock(engine: Engine) -> None:
    now = [1234.5]
    store = engine.open(clock=lambda: now[0])
    made = store.add(key_of(1), "key-a")
    assert (made.created_at, made.last_used_at) == (1234.5, 1234.5)
    now[0] = 2000.25
    used = store.use(made.id)
    assert used is not None and used.last_used_at == 2000.25
    assert store.expire(unused_since=2000.25) == [] and store.expire(unused_since=2000.5) == [used]


@pytest.mark.engines("redis")
def test_redis_upload_store_leaves_nothing_behind(engine: Engine, upload_store: UploadStore) -> None:
    made = [upload_store.add(key_of(i), "key-a", now=100.0) for i in range(3)]
    upload_store.use(made[0].id, now=200.0)
    assert upload_store.forget(u.id for u in upload_store.expire(unused_since=1000.0)) == 3
    assert engine.redis_keys() == []


def test_files_that_no_record_refers_to_are_deleted_in_the_end(api: Harness) -> None:
    """Outputs of a worker that died between writing and recording them, or the image copy
    of a create whose process died before its insert, must not stay on disk for ever."""
    from fluxredux.storage import new_key

    kept = upload(api)
    prediction = run_from(api, png_data_uri())
    orphan = new_key("png")
    api.services.blobs.put(orphan, b"\x89PNG written, never recorded", "image/png")
    long_ago = time.time() - 3 * retention(api)
    for path in api.services.settings.files_dir.iterdir():
        os.utime(path, (long_ago, long_ago))
    delete_expired(api.services)
    assert not api.services.blobs.exists(orphan)
    for url in (kept["url"], str(prediction["output"]), str(prediction["input"]["redux_image"])):
        assert httpx.get(url).status_code == 200  # still referenced: kept, however old the file
