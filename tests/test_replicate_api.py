"""The Replicate-compatible surface over HTTP, in detail: its shapes, Bearer keys, Prefer:
wait, problem-details errors (the Eachlabs surface keeping its own), one state machine for
both surfaces, files as Replicate's clients send them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.pipeline.fake import FakeModel
from tests.harness import Harness, png_data_uri, running_server

MODEL = "black-forest-labs/flux-redux-schnell"
PNG = base64.b64decode(png_data_uri().split(",", 1)[1])


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, replicate_model_alias="acme/redux") as harness:
        yield harness


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[Harness]:
    """Each denoising step takes 0.5 s: a prediction runs for seconds."""
    with running_server(tmp_path, model=FakeModel(step_seconds=0.5)) as harness:
        yield harness


def bearer(api: Harness) -> httpx.Client:
    """A client that sends the key as Replicate's clients do, and only that way."""
    return httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30)


def body(**inputs: Any) -> dict[str, Any]:
    return {"input": {"redux_image": png_data_uri(), **inputs}}


def test_create_and_read_in_replicates_shape(api: Harness) -> None:
    with bearer(api) as http:
        created = http.post(f"/v1/models/{MODEL}/predictions", json=body(num_outputs=1))
        assert created.status_code == 201, created.text
        prediction = created.json()
        assert prediction["status"] == "starting" and prediction["output"] is None
        assert prediction["model"] == MODEL and prediction["version"] == "0.0.1"
        assert prediction["urls"] == {
            "get": f"{api.url}/v1/predictions/{prediction['id']}",
            "cancel": f"{api.url}/v1/predictions/{prediction['id']}/cancel",
            "web": f"{api.url}/",
            "stream": f"{api.url}/v1/predictions/{prediction['id']}/stream",
        }
        done = api.wait_status(prediction["id"], {"success"})
        assert done["status"] == "success"
        read = http.get(prediction["urls"]["get"]).json()
    # One image asked for: still a list, as the hosted model returns it.
    assert read["status"] == "succeeded" and read["output"] == [done["output"]]
    assert read["metrics"]["predict_time"] > 0 and read["completed_at"].endswith("Z")
    assert read["input"]["redux_image"].startswith(f"{api.url}/files/")
    assert set(read) >= {"id", "model", "version", "input", "output", "error", "logs", "status"}


def test_an_eachlabs_prediction_is_read_cancelled_and_listed_on_the_replicate_surface(
    slow_api: Harness,
) -> None:
    api = slow_api
    eachlabs_id = api.create_id()  # X-API-Key, /v1/prediction/
    with bearer(api) as http:
        assert http.get(f"/v1/predictions/{eachlabs_id}").json()["status"] in {"starting", "processing"}
        cancelled = http.post(f"/v1/predictions/{eachlabs_id}/cancel")
        assert cancelled.status_code == 200
        assert api.wait_status(eachlabs_id, {"cancelled"})["status"] == "cancelled"
        assert http.get(f"/v1/predictions/{eachlabs_id}").json()["status"] == "canceled"
        replicate_id = http.post("/v1/predictions", json=body()).json()["id"]
        listed = http.get("/v1/predictions").json()
    assert [p["id"] for p in listed["results"]] == [replicate_id, eachlabs_id]
    assert listed["next"] is None and listed["previous"] is None
    # And the other way round: the Eachlabs surface reads and cancels the Replicate one.
    assert api.http.post(f"/v1/prediction/{replicate_id}/cancel").status_code == 200
    assert api.wait_status(replicate_id, {"cancelled"})["status"] == "cancelled"


def test_list_pages_follow_next_urls(api: Harness) -> None:
    with bearer(api) as http:
        made = [http.post("/v1/predictions", json=body()).json()["id"] for _ in range(3)]
        first = http.get("/v1/predictions", params={"limit": 2}).json()
        assert [p["id"] for p in first["results"]] == made[:0:-1]
        assert first["next"].startswith(f"{api.url}/v1/predictions?cursor=")
        second = http.get(first["next"]).json()  # as the client does: the URL as given
    assert [p["id"] for p in second["results"]] == made[:1] and second["next"] is None


def test_the_model_alias_and_versions(api: Harness) -> None:
    with bearer(api) as http:
        assert http.post("/v1/models/acme/redux/predictions", json=body()).status_code == 201
        unknown = http.post("/v1/models/acme/other/predictions", json=body())
        assert unknown.status_code == 404 and "acme/other" in unknown.json()["detail"]
        by_version = http.post("/v1/predictions", json=body() | {"version": "abc123"}).json()
        assert by_version["version"] == "abc123"
        named = http.post("/v1/predictions", json=body() | {"version": f"{MODEL}:v2"}).json()
        assert named["version"] == "v2"
        other = http.post("/v1/predictions", json=body() | {"version": "someone/else:v1"})
        assert other.status_code == 404 and other.json()["code"] == "unknown_model"


def test_prefer_wait_holds_the_create_until_the_end(api: Harness) -> None:
    with bearer(api) as http:
        done = http.post("/v1/predictions", json=body(), headers={"Prefer": "wait"}).json()
    assert done["status"] == "succeeded" and len(done["output"]) == 1


def test_prefer_wait_n_answers_after_n_seconds_as_starting(slow_api: Harness) -> None:
    """Still running when the wait ends: shown as starting, as Replicate does, because the
    official client polls only a starting answer (it takes any other one as final)."""
    with bearer(slow_api) as http:
        response = http.post("/v1/predictions", json=body(), headers={"Prefer": "wait=1"})
        elapsed = response.elapsed.total_seconds()
        prediction = response.json()
        assert elapsed > 0.9  # it waited; that the job still runs shows it did not wait for the end
        assert prediction["status"] == "starting"
        assert http.get(prediction["urls"]["get"]).json()["status"] == "processing"


@pytest.mark.parametrize("prefer", ["wait=0", "wait=61", "wait=soon"])
def test_a_bad_prefer_wait_is_a_422_naming_the_header(api: Harness, prefer: str) -> None:
    with bearer(api) as http:
        response = http.post("/v1/predictions", json=body(), headers={"Prefer": prefer})
    assert response.status_code == 422
    assert response.json()["fields"][0]["field"] == "Prefer" and "Prefer" in response.json()["detail"]
    assert sum(api.services.store.counts_by_status().values()) == 0


def test_other_preferences_are_ignored(api: Harness) -> None:
    with bearer(api) as http:
        response = http.post("/v1/predictions", json=body(), headers={"Prefer": "respond-async"})
    assert response.status_code == 201 and response.json()["status"] == "starting"


def test_errors_are_problem_details_here_and_eachlabs_errors_there(api: Harness) -> None:
    with bearer(api) as http:
        invalid = http.post("/v1/predictions", json=body(num_outputs=9, colour="red"))
        missing = http.get("/v1/predictions/nope")
        wrong_method = http.put("/v1/predictions")
    assert invalid.status_code == 422
    problem = invalid.json()
    assert problem["title"] == "Input validation failed" and problem["status"] == 422
    assert "input.num_outputs" in problem["detail"] and "unknown field 'input.colour'" in problem["detail"]
    assert {f["field"] for f in problem["fields"]} == {"input.num_outputs", "input.colour"}
    assert "error" not in problem
    assert missing.status_code == 404 and missing.json()["title"] == "Not Found"
    assert wrong_method.status_code == 405 and wrong_method.json()["status"] == 405

    unauthenticated = httpx.post(f"{api.url}/v1/predictions", json=body())
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["status"] == 401 and "detail" in unauthenticated.json()

    # The Eachlabs surface keeps its own shape and its 400.
    eachlabs = api.http.post("/v1/prediction/", json=api.body(num_outputs=9))
    assert eachlabs.status_code == 400 and eachlabs.json()["code"] == "invalid_input"
    assert "title" not in eachlabs.json()


def test_an_unusable_webhook_is_named_as_webhook(api: Harness) -> None:
    with bearer(api) as http:
        response = http.post("/v1/predictions", json=body() | {"webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 422
    assert response.json()["field"] == "webhook" and response.json()["detail"].startswith("webhook:")


def test_upload_with_content_answers_a_file_usable_as_redux_image(api: Harness) -> None:
    with bearer(api) as http:
        uploaded = http.post(
            "/v1/files",
            files={"content": ("ref.png", PNG, "image/png")},
            data={"metadata": '{"purpose": "test"}'},
        )
        assert uploaded.status_code == 200, uploaded.text
        file = uploaded.json()
        assert file["name"] == "ref.png" and file["metadata"] == {"purpose": "test"}
        assert file["content_type"] == "image/png" and file["size"] == len(PNG)
        assert len(file["checksums"]["sha256"]) == 64 and file["expires_at"] > file["created_at"]
        assert httpx.get(file["urls"]["get"]).content == PNG
        # Its URL as redux_image: used in place, never fetched (this loopback server
        # refuses to fetch loopback URLs).
        created = http.post("/v1/predictions", json=body() | {"input": {"redux_image": file["urls"]["get"]}})
        assert created.status_code == 201, created.text
        done = api.wait_status(created.json()["id"], {"success", "error"})
        assert done["status"] == "success", done

        read = http.get(f"/v1/files/{file['id']}").json()
        assert {k: read[k] for k in ("id", "size", "checksums", "urls")} == {
            k: file[k] for k in ("id", "size", "checksums", "urls")
        }
        assert http.delete(f"/v1/files/{file['id']}").status_code == 204
        assert http.get(f"/v1/files/{file['id']}").status_code == 404
        assert httpx.get(file["urls"]["get"]).status_code == 404
        assert http.delete(f"/v1/files/{file['id']}").status_code == 404


def test_the_file_field_keeps_its_answer_and_bad_uploads_are_named(api: Harness) -> None:
    old = api.http.post("/v1/files", files={"file": ("ref.png", PNG, "image/png")}).json()
    assert set(old) == {"id", "url", "content_type", "size", "width", "height"}
    neither = api.http.post("/v1/files", files={"other": ("ref.png", PNG, "image/png")})
    assert neither.status_code == 400
    # POST /v1/files serves both surfaces' clients: both error shapes in one body.
    assert neither.json()["fields"][0]["field"] == "file" and neither.json()["detail"]
    assert neither.json()["code"] == "invalid_input" and neither.json()["error"]
    bad_metadata = api.http.post(
        "/v1/files", files={"content": ("ref.png", PNG, "image/png")}, data={"metadata": "[1]"}
    )
    assert bad_metadata.status_code == 400 and bad_metadata.json()["fields"][0]["field"] == "metadata"
    nested = api.http.post(  # deeper than the JSON parser's stack: was a 500
        "/v1/files", files={"content": ("ref.png", PNG, "image/png")}, data={"metadata": "[" * 15000}
    )
    assert nested.status_code == 400 and nested.json()["fields"][0]["field"] == "metadata"


def test_another_keys_file_is_not_found(api: Harness) -> None:
    _key, other = api.services.keys.create("other")
    with bearer(api) as http:
        file = http.post("/v1/files", files={"content": ("ref.png", PNG, "image/png")}).json()
    stranger = {"Authorization": f"Bearer {other}"}
    assert httpx.get(f"{api.url}/v1/files/{file['id']}", headers=stranger).status_code == 404
    assert httpx.delete(f"{api.url}/v1/files/{file['id']}", headers=stranger).status_code == 404
    assert httpx.get(file["urls"]["get"]).status_code == 200  # still there


def test_the_webhook_secret_is_per_key_and_standard(api: Harness) -> None:
    _key, other = api.services.keys.create("other")
    with bearer(api) as http:
        mine = http.get("/v1/webhooks/default/secret").json()["key"]
        again = http.get("/v1/webhooks/default/secret").json()["key"]
    theirs = httpx.get(
        f"{api.url}/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {other}"}
    ).json()["key"]
    assert mine == again != theirs
    assert mine.startswith("whsec_") and len(base64.b64decode(mine.removeprefix("whsec_"))) == 32
    assert httpx.get(f"{api.url}/v1/webhooks/default/secret").status_code == 401


def test_a_missing_reference_names_redux_image_on_both_surfaces(api: Harness) -> None:
    with bearer(api) as http:
        replicate = http.post("/v1/predictions", json={"input": {"num_outputs": 1}}).json()
    eachlabs = api.http.post("/v1/prediction/", json={"model": "flux-redux-schnell", "input": {}}).json()
    for error in (replicate, eachlabs):
        assert error["fields"][0]["field"] == "input.redux_image", error


def test_a_job_stored_before_the_replicate_surface_reads_as_an_eachlabs_one() -> None:
    import json

    from fluxredux.jobs.job import Job, job_from_json, job_to_json

    stored = json.loads(job_to_json(Job(id="j1", owner="k", input={}, created_at=1.0)))
    for newer in ("surface", "webhook_events"):
        del stored[newer]
    job = job_from_json(json.dumps(stored))
    assert (job.surface, job.webhook_events) == ("eachlabs", ["completed"])
