"""The HTTP API as a client sees it, on a real server (fake model: flat colours, no torch)."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fluxredux.pipeline.fake import FakeModel
from tests.harness import Harness, png_data_uri, running_server


@pytest.fixture
def api(tmp_path: Path) -> Harness:
    with running_server(tmp_path) as harness:
        yield harness


@pytest.fixture
def queued_api(tmp_path: Path) -> Harness:
    """No worker: predictions stay queued."""
    with running_server(tmp_path, run_worker=False) as harness:
        yield harness


def test_create_poll_and_download(api: Harness) -> None:
    created = api.create(num_outputs="1", output_format="png", seed="5")
    assert created.status_code == 200
    body = created.json()
    assert body["status"] == "success" and body["predictionID"]
    prediction = api.get(body["predictionID"], wait=10)
    assert prediction["status"] == "success"
    assert isinstance(prediction["output"], str)  # one image: one URL
    assert prediction["seed"] == 5
    assert set(prediction["metrics"]) >= {"predict_time", "queue_time", "total_time"}
    assert prediction["urls"]["get"].endswith(f"/v1/prediction/{body['predictionID']}")
    image = httpx.get(prediction["output"])  # no key: the unguessable URL is the capability
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)


def test_several_outputs_are_a_list_with_the_right_content_type(api: Harness) -> None:
    prediction = api.get(api.create_id(num_outputs=3, megapixels="0.25", output_format="jpg"), wait=10)
    assert isinstance(prediction["output"], list) and len(prediction["output"]) == 3
    for url in prediction["output"]:
        response = httpx.get(url)
        assert response.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(response.content)).format == "JPEG"
    assert len(set(prediction["output"])) == 3


def test_the_input_is_echoed_without_the_data_uri(api: Harness) -> None:
    prediction = api.get(api.create_id(aspect_ratio="16:9"), wait=10)
    assert prediction["input"]["aspect_ratio"] == "16:9"
    assert prediction["input"]["redux_image"].startswith(api.url + "/files/")
    assert httpx.get(prediction["input"]["redux_image"]).headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("change", "status", "code", "text"),
    [
        ({"model": "sdxl"}, 400, "unknown_model", "unknown model 'sdxl'"),
        ({"input": {"redux_image": "x" * 3}}, 400, "invalid_input", "input.redux_image"),
        ({"input": {"num_outputs": 7}}, 400, "invalid_input", "input.num_outputs"),
        ({"input": {"redux_strength": 1.5}}, 400, "invalid_input", "input.redux_strength"),
        ({"input": {"redux_image_crop": "fill"}}, 400, "invalid_input", "input.redux_image_crop"),
        ({"input": {"prompt": "x" * 2001}}, 400, "invalid_input", "input.prompt"),
        ({"input": {"steps": 4}}, 400, "invalid_input", "unknown field 'input.steps'"),
        (
            {"input": {"redux_image": "data:image/png;base64,aGVsbG8="}},
            400,
            "image_not_an_image",
            "not an image",
        ),
        ({"input": {"redux_image": "data:,"}}, 400, "image_empty", "empty"),
        (
            {"input": {"redux_image": "AAAAAAAAAAAAAAAAAAAAAA"}},
            404,  # a file that is not there (or not the caller's), as GET /v1/files/{id} says
            "image_file_not_found",
            "no uploaded file",
        ),
        ({"webhook_url": "ftp://x"}, 400, "url_scheme", "only http and https"),
        ({"extra": 1}, 400, "invalid_input", "unknown field 'extra'"),
    ],
)
def test_client_mistakes_get_a_clear_4xx_naming_the_field(
    api: Harness, change: dict, status: int, code: str, text: str
) -> None:
    body = api.body()
    for key, value in change.items():
        if key == "input":
            body["input"].update(value)
        else:
            body[key] = value
    response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == status
    error = response.json()
    assert error["code"] == code
    assert text in error["error"]
    assert sum(api.services.store.counts_by_status().values()) == 0  # nothing was queued,
    assert api.create().status_code == 200  # yet the server takes a good request,
    assert sum(api.services.store.counts_by_status().values()) == 1  # and counting sees it


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        # A JSON bool is no number (lax parsing would read true as 1, false as 0)...
        ({"num_outputs": True}, "input.num_outputs"),
        ({"num_inference_steps": True}, "input.num_inference_steps"),
        ({"seed": False}, "input.seed"),
        ({"output_quality": True}, "input.output_quality"),
        ({"megapixels": True}, "input.megapixels"),
        ({"redux_strength": True}, "input.redux_strength"),
        ({"redux_images": [{"image": png_data_uri(), "weight": True}]}, "input.redux_images.0.weight"),
        # ...and a string or a number is no boolean ("yes", 1 and 0 were read as true/false).
        ({"disable_safety_checker": "yes"}, "input.disable_safety_checker"),
        ({"disable_safety_checker": "true"}, "input.disable_safety_checker"),
        ({"disable_safety_checker": 1}, "input.disable_safety_checker"),
        ({"disable_safety_checker": 0}, "input.disable_safety_checker"),
    ],
)
def test_booleans_and_numbers_are_never_mixed_up(api: Harness, inputs: dict, field: str) -> None:
    eachlabs = api.http.post("/v1/prediction/", json=api.body(**inputs))
    assert eachlabs.status_code == 400, eachlabs.text
    assert eachlabs.json()["code"] == "invalid_input"
    assert [f["field"] for f in eachlabs.json()["fields"]] == [field]
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}) as replicate:
        problem = replicate.post("/v1/predictions", json={"input": api.body(**inputs)["input"]})
    assert problem.status_code == 422, problem.text
    assert [f["field"] for f in problem.json()["fields"]] == [field]
    assert sum(api.services.store.counts_by_status().values()) == 0  # nothing was queued


def test_the_hosted_apis_string_numbers_and_json_booleans_are_accepted(api: Harness) -> None:
    # The product page's own example sends numbers as strings: those stay accepted.
    inputs = {"num_outputs": "2", "output_quality": "80", "num_inference_steps": "4", "megapixels": "1"}
    prediction = api.get(api.create_id(**inputs, seed="5", disable_safety_checker=True), wait=10)
    assert prediction["status"] == "success"
    assert (prediction["input"]["num_outputs"], prediction["input"]["output_quality"]) == (2, 80)
    assert prediction["input"]["disable_safety_checker"] is True and prediction["seed"] == 5


def test_a_malformed_json_body_is_a_400(api: Harness) -> None:
    response = api.http.post(
        "/v1/prediction/", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"
    assert response.json()["fields"][0]["field"] == "body"  # not the character position it failed at
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}) as replicate:
        problem = replicate.post(
            "/v1/predictions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert problem.status_code == 422 and problem.json()["fields"][0]["field"] == "body"


def test_keys(api: Harness) -> None:
    url = api.url + "/v1/prediction/"
    assert httpx.post(url, json=api.body()).status_code == 401
    bad = httpx.post(url, json=api.body(), headers={"X-API-Key": "fr_000000000000_nope"})
    assert (bad.status_code, bad.json()["code"]) == (401, "unauthorized")
    bearer = httpx.post(url, json=api.body(), headers={"Authorization": f"Bearer {api.key}"})
    assert bearer.status_code == 200


def test_unknown_and_foreign_ids_are_404(api: Harness) -> None:
    assert api.http.get("/v1/prediction/nope").status_code == 404
    prediction_id = api.create_id()
    _key, other = api.services.keys.create("someone else")
    foreign = httpx.get(f"{api.url}/v1/prediction/{prediction_id}", headers={"X-API-Key": other})
    assert (foreign.status_code, foreign.json()["code"]) == (404, "not_found")
    assert httpx.get(f"{api.url}/files/AAAAAAAAAAAAAAAAAAAAAA.png").status_code == 404
    assert httpx.get(f"{api.url}/files/..%2Ffluxredux.db").status_code == 404


def test_the_61st_creation_in_a_minute_is_429(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False, max_in_flight_per_key=1000) as api:
        body = api.body()
        for _ in range(60):
            assert api.http.post("/v1/prediction/", json=body).status_code == 200
        refused = api.http.post("/v1/prediction/", json=body)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.json()["code"] == "rate_limited"
        assert api.services.lifecycle.queue_depth() == 60  # nothing more was queued
        assert api.http.get("/v1/prediction/").status_code == 200  # polling is not counted


def test_the_11th_prediction_in_flight_is_429(queued_api: Harness) -> None:
    for _ in range(10):
        queued_api.create_id()
    refused = queued_api.create()
    assert refused.status_code == 429
    assert "in flight" in refused.json()["error"]
    assert refused.headers["Retry-After"]
    _key, other = queued_api.services.keys.create("other")  # the limit is per key
    assert (
        httpx.post(
            queued_api.url + "/v1/prediction/", json=queued_api.body(), headers={"X-API-Key": other}
        ).status_code
        == 200
    )


def test_a_full_queue_is_503(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False, max_queue=2) as api:
        api.create_id(), api.create_id()
        refused = api.create()
        assert refused.status_code == 503 and refused.json()["code"] == "queue_full"
        assert refused.headers["Retry-After"]


def test_an_oversized_body_is_413(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False, max_body_bytes=10_000) as api:
        response = api.http.post("/v1/prediction/", json=api.body() | {"pad": "x" * 20_000})
        assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


def test_cancel_a_queued_prediction(queued_api: Harness) -> None:
    prediction_id = queued_api.create_id()
    response = queued_api.http.post(f"/v1/prediction/{prediction_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert queued_api.http.post(f"/v1/prediction/{prediction_id}/cancel").json()["status"] == "cancelled"


def test_cancel_a_running_prediction_stops_within_a_step(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.3)) as api:
        prediction_id = api.create_id(num_inference_steps=4)
        running = api.wait_status(prediction_id, {"processing"})
        assert running["status"] == "processing"
        asked = time.monotonic()
        api.http.post(f"/v1/prediction/{prediction_id}/cancel")
        final = api.get(prediction_id, wait=10)
        assert final["status"] == "cancelled"
        assert time.monotonic() - asked < 1.0  # one 0.3 s step, plus margin
        assert final["output"] is None


def test_cancel_after_success_changes_nothing(api: Harness) -> None:
    prediction_id = api.create_id()
    done = api.get(prediction_id, wait=10)
    again = api.http.post(f"/v1/prediction/{prediction_id}/cancel").json()
    assert again["status"] == "success" and again["output"] == done["output"]


def test_long_poll_answers_within_100ms_of_completion(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.15)) as api:
        prediction_id = api.create_id(num_inference_steps=4)
        response = api.http.get(f"/v1/prediction/{prediction_id}", params={"wait": 20})
        answered = time.time()
        prediction = response.json()
        assert prediction["status"] == "success"
        job = api.services.store.get(prediction_id)
        assert job is not None and job.completed_at is not None
        assert answered - job.completed_at < 0.1


def test_long_poll_gives_up_after_wait(queued_api: Harness) -> None:
    prediction_id = queued_api.create_id()
    started = time.monotonic()
    assert queued_api.get(prediction_id, wait=0.5)["status"] == "starting"
    assert 0.45 < time.monotonic() - started < 3


def test_sync_run(api: Harness) -> None:
    response = api.http.post("/v1/prediction/run", json=api.body(num_outputs=2, megapixels="0.25"))
    assert response.status_code == 200
    prediction = response.json()
    assert prediction["status"] == "success" and len(prediction["output"]) == 2


def test_list_is_newest_first_and_paginated(api: Harness) -> None:
    ids = [api.create_id() for _ in range(5)]
    first = api.http.get("/v1/prediction/", params={"limit": 3}).json()
    assert [p["id"] for p in first["items"]] == ids[::-1][:3]
    second = api.http.get("/v1/prediction/", params={"limit": 3, "cursor": first["next"]}).json()
    assert [p["id"] for p in second["items"]] == ids[::-1][3:]
    assert second["next"] is None


def test_upload_then_use_the_file_id(api: Harness) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, "WEBP")
    uploaded = api.http.post(
        "/v1/files", files={"file": ("ref.webp", buffer.getvalue(), "image/webp")}
    ).json()
    assert (uploaded["width"], uploaded["height"], uploaded["content_type"]) == (40, 30, "image/webp")
    body = api.body()
    body["input"]["redux_image"] = uploaded["id"]
    created = api.http.post("/v1/prediction/", json=body)
    assert created.status_code == 200
    assert api.get(created.json()["predictionID"], wait=10)["status"] == "success"


def test_uploading_a_non_image_is_a_400(api: Harness) -> None:
    response = api.http.post(
        "/v1/files", files={"file": ("notes.txt", b"hello there, not an image", "text/plain")}
    )
    assert response.status_code == 400 and response.json()["code"] == "image_not_an_image"


def test_health_and_metrics(api: Harness) -> None:
    api.get(api.create_id(), wait=10)
    health = httpx.get(api.url + "/health").json()
    assert health["status"] == "ok" and health["model"]["ready"] is True
    metrics = httpx.get(api.url + "/metrics").text
    assert 'fluxredux_predictions{status="succeeded"} 1.0' in metrics
    assert "fluxredux_queue_depth 0.0" in metrics
    assert "fluxredux_predict_time_seconds_count 1.0" in metrics
    assert 'fluxredux_http_requests_total{method="POST",route="/v1/prediction/",status="200"} 1.0' in metrics


def test_openapi_describes_the_input_model(api: Harness) -> None:
    schema = httpx.get(api.url + "/openapi.json").json()
    properties = schema["components"]["schemas"]["PredictionInput"]["properties"]
    assert properties["aspect_ratio"]["enum"][:2] == ["1:1", "16:9"]
    assert properties["prompt"]["examples"] == ["a watercolour painting, soft morning light"]
    assert properties["prompt"]["anyOf"][0]["maxLength"] == 2000
    assert "/v1/prediction/{prediction_id}/cancel" in schema["paths"]


def test_progress_is_reported_while_running(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.2)) as api:
        prediction_id = api.create_id(num_inference_steps=4)
        seen = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            prediction = api.get(prediction_id)
            seen.add(prediction["progress"]["step"])
            if prediction["status"] == "success":
                break
            time.sleep(0.05)
        assert {1, 2, 3} & seen and 4 in seen
        assert prediction["progress"] == {"step": 4, "total": 4, "phase": None}  # ended: no phase


def test_concurrent_long_polls_all_wake(api: Harness) -> None:
    ids = [api.create_id() for _ in range(5)]
    results: list[str] = []

    def poll(prediction_id: str) -> None:
        results.append(
            httpx.get(
                f"{api.url}/v1/prediction/{prediction_id}?wait=10", headers={"X-API-Key": api.key}
            ).json()["status"]
        )

    threads = [threading.Thread(target=poll, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["success"] * 5


def test_png_data_uri_helper_is_a_real_image() -> None:
    header, _, payload = png_data_uri(30, 20).partition(",")
    assert header == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()  # decodes the pixels, not just the header
    assert (image.format, image.size, image.mode) == ("PNG", (30, 20), "RGB")


def test_retention_deletes_old_predictions_and_their_files(api: Harness) -> None:
    from fluxredux.api.maintenance import delete_expired

    prediction = api.get(api.create_id(), wait=10)
    assert httpx.get(prediction["output"]).status_code == 200
    assert delete_expired(api.services) == 0  # nothing is old yet
    week_later = time.time() + api.services.settings.retention_hours * 3600 + 60
    assert delete_expired(api.services, now=week_later) == 1
    assert api.http.get(f"/v1/prediction/{prediction['id']}").status_code == 404
    assert httpx.get(prediction["output"]).status_code == 404
    assert httpx.get(prediction["input"]["redux_image"]).status_code == 404


def test_creation_is_refused_while_the_model_cannot_load(queued_api: Harness) -> None:
    error = {"error": "FLUX.1 [schnell] weights not found: ...", "code": "weights_not_found"}
    queued_api.workers.error = error
    response = queued_api.create()
    assert response.status_code == 503
    assert response.json()["code"] == "model_unavailable"
    assert "weights not found" in response.json()["error"]
    assert queued_api.services.lifecycle.queue_depth() == 0


def test_concurrent_creations_cannot_exceed_the_in_flight_limit(queued_api: Harness) -> None:
    """Twenty creations at once race through image decoding; the limit still holds."""
    body = queued_api.body()
    statuses: list[int] = []

    def create() -> None:
        statuses.append(
            httpx.post(
                queued_api.url + "/v1/prediction/", json=body, headers={"X-API-Key": queued_api.key}
            ).status_code
        )

    threads = [threading.Thread(target=create) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 10 + [429] * 10
    assert queued_api.services.lifecycle.queue_depth() == 10


def test_a_streamed_body_without_length_is_capped_too(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False, max_body_bytes=10_000) as api:

        def chunks() -> Iterator[bytes]:
            yield b'{"model": "flux-redux-schnell", "input": {"redux_image": "'
            for _ in range(20):
                yield b"x" * 1000
            yield b'"}}'

        response = api.http.post(
            "/v1/prediction/", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"


def test_a_refused_create_keeps_no_copy_of_its_image(tmp_path: Path) -> None:
    """A create refused after its image was stored (here: the database is locked) must not
    leave the image behind; a file uploaded earlier stays, since others may use it."""
    import sqlite3

    with running_server(tmp_path, run_worker=False, store_busy_timeout_seconds=0.3) as api:
        upload = api.http.post(
            "/v1/files", files={"file": ("a.png", base64.b64decode(png_data_uri().split(",")[1]))}
        )
        assert upload.status_code == 200, upload.text
        files_dir = api.services.settings.files_dir
        before = sorted(p.name for p in files_dir.iterdir())
        holder = sqlite3.connect(api.services.settings.database_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            refused = api.create()
            assert refused.status_code == 503 and refused.json()["code"] == "store_unavailable", refused.text
            assert "Retry-After" in refused.headers
            reused = api.http.post(
                "/v1/prediction/", json=api.body() | {"input": {"redux_image": upload.json()["id"]}}
            )
            assert reused.status_code == 503
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert sorted(p.name for p in files_dir.iterdir()) == before


def test_a_waiting_prediction_shows_its_place_in_the_queue(queued_api: Harness) -> None:
    ids = [queued_api.create_id() for _ in range(3)]
    assert [queued_api.get(i)["queue_position"] for i in ids] == [0, 1, 2]
    queued_api.http.post(f"/v1/prediction/{ids[0]}/cancel")
    assert [queued_api.get(i)["queue_position"] for i in ids] == [None, 0, 1]


def test_a_long_poll_survives_a_lost_wake_up(queued_api: Harness) -> None:
    """The job ends without any event reaching this server (a message lost on the bus):
    the long-poll still answers, from its slow re-read, well before its wait is over."""
    from fluxredux.jobs import transition
    from fluxredux.jobs.job import Status

    prediction_id = queued_api.create_id()

    def end_silently() -> None:
        time.sleep(0.5)
        queued_api.services.store.update(
            prediction_id, lambda job: transition(job, Status.CANCELED, time.time())
        )  # straight to the store: no lifecycle, no event

    threading.Thread(target=end_silently).start()
    started = time.monotonic()
    answer = queued_api.get(prediction_id, wait=30)
    assert answer["status"] == "cancelled"
    assert time.monotonic() - started < 8


def test_several_references_are_stored_shown_and_deleted_together(api: Harness) -> None:
    from fluxredux.api.maintenance import delete_expired

    references = [{"image": png_data_uri(24, 16), "weight": 2}, {"image": png_data_uri(16, 24), "weight": 1}]
    response = api.http.post(
        "/v1/prediction/", json={"model": "flux-redux-schnell", "input": {"redux_images": references}}
    )
    assert response.status_code == 200, response.text
    prediction = api.get(response.json()["predictionID"], wait=10)
    assert prediction["status"] == "success", prediction
    shown = prediction["input"]["redux_images"]
    assert [item["weight"] for item in shown] == [2, 1] and prediction["input"]["redux_image"] is None
    sizes = [Image.open(io.BytesIO(httpx.get(item["image"]).content)).size for item in shown]
    assert sizes == [(24, 16), (16, 24)]  # each reference, in order, as a link (not a data: URI)

    week_later = time.time() + api.services.settings.retention_hours * 3600 + 60
    assert delete_expired(api.services, now=week_later) == 1
    assert [httpx.get(item["image"]).status_code for item in shown] == [404, 404]


def test_a_bad_second_reference_is_a_400_and_keeps_no_copy_of_the_first(api: Harness) -> None:
    files_dir = api.services.settings.files_dir
    before = sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []
    references = [{"image": png_data_uri()}, {"image": "data:image/png;base64,aGVsbG8="}]
    response = api.http.post(
        "/v1/prediction/", json={"model": "flux-redux-schnell", "input": {"redux_images": references}}
    )
    assert response.status_code == 400 and response.json()["code"].startswith("image_"), response.text
    after = sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []
    assert after == before
