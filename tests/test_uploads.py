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

from fluxredux.maintenance import delete_expired
from fluxredux.uploads import UploadStore
from tests.harness import Harness, png_data_uri, running_server


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
    assert refused.status_code == 400 and refused.json()["code"] == "image_file_not_found"
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
        assert refused.status_code == 400 and refused.json()["code"] == "image_file_not_found", url


def test_upload_store_contract(tmp_path: Path) -> None:
    """The small interface a Redis store must offer too."""
    store = UploadStore(tmp_path / "uploads.db")
    try:
        a = store.add("AAAAAAAAAAAAAAAAAAAAAA.png", "key-a", now=100.0)
        b = store.add("BBBBBBBBBBBBBBBBBBBBBB.jpg", "key-b", now=200.0)
        assert (a.id, a.key, a.owner, a.created_at, a.last_used_at) == (
            "AAAAAAAAAAAAAAAAAAAAAA",
            "AAAAAAAAAAAAAAAAAAAAAA.png",
            "key-a",
            100.0,
            100.0,
        )
        assert store.get(a.id) == a and store.get("CCCCCCCCCCCCCCCCCCCCCC") is None
        used = store.use(a.id, now=300.0)
        assert used is not None and used.last_used_at == 300.0 and used.created_at == 100.0
        assert store.use(a.id, now=250.0) == used  # never moves back
        assert store.use("nope") is None
        assert store.uploaded([a.key, b.key, "CCCCCCCCCCCCCCCCCCCCCC.png"]) == {a.key, b.key}
        assert store.uploaded([]) == set()
        assert store.uploaded(f"{i:022d}.png" for i in range(2000)) == set()  # batched

        expired = store.expire(unused_since=250.0)
        assert [u.id for u in expired] == [b.id]
        assert store.get(b.id) is None and store.use(b.id) is None  # no longer found...
        assert store.uploaded([b.key]) == {b.key}  # ...but still known until forgotten
        assert [u.id for u in store.expire(unused_since=250.0)] == [b.id]  # not forgotten: again
        assert store.forget([b.id, a.id]) == 1  # only expired records go
        assert store.expire(unused_since=250.0) == []
        assert store.get(a.id) is not None and store.uploaded([b.key]) == set()
    finally:
        store.close()


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
