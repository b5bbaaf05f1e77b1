"""HTTP edges a new user trips on in the first hour: the API docs on a machine without
internet, a create URL typed without its trailing slash, a JSON body sent without its
content type (curl -d), a bad input for a model the server does not run, and a missing
S3 bucket in the log."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.storage import BlobStoreError
from fluxredux.storage.s3 import S3BlobStore, for_operator
from tests.harness import Harness, png_data_uri, running_server
from tests.test_faults import serve

MODEL = "black-forest-labs/flux-redux-schnell"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path) as harness:
        yield harness


def bearer(api: Harness) -> httpx.Client:
    return httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30)


# --- /docs and /redoc without a CDN -------------------------------------------------------

# src=, href=, spec-url= and url: '...' in the page: everything it loads or points at.
_REFERENCES = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url\s*:\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_everything_from_this_server(api: Harness, page: str) -> None:
    response = httpx.get(api.url + page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "cdn" not in html.lower() and "googleapis" not in html
    assert not re.search(r"(?:https?:)?//[a-z0-9]", html, re.IGNORECASE), "the page names another host"
    references = [first or second for first, second in _REFERENCES.findall(html)]
    assert any(ref.endswith(".js") for ref in references), references
    for ref in references:
        assert ref.startswith("/"), ref
        loaded = httpx.get(api.url + ref)
        assert loaded.status_code == 200, ref
    assert "/openapi.json" in references


def test_the_docs_assets_have_their_types(api: Harness) -> None:
    html = httpx.get(api.url + "/docs").text
    references = [first or second for first, second in _REFERENCES.findall(html)]
    types = {
        ref.rsplit(".", 1)[1]: httpx.get(api.url + ref).headers["content-type"]
        for ref in references
        if ref.endswith((".js", ".css", ".png"))
    }
    assert types["js"].startswith(("text/javascript", "application/javascript"))
    assert types["css"].startswith("text/css")
    assert types["png"] == "image/png"


def test_the_docs_pages_are_not_operations_of_the_api(api: Harness) -> None:
    paths = httpx.get(api.url + "/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]


# --- /v1/prediction without its trailing slash ----------------------------------------------


def test_a_create_without_the_trailing_slash_creates_without_a_redirect(api: Harness) -> None:
    response = api.http.post("/v1/prediction", json=api.body(), follow_redirects=False)
    assert response.status_code == 200, response.text
    prediction_id = response.json()["predictionID"]
    assert api.wait_status(prediction_id, {"success"})["status"] == "success"


def test_the_list_without_the_trailing_slash_lists_without_a_redirect(api: Harness) -> None:
    prediction_id = api.create_id()
    response = api.http.get("/v1/prediction", follow_redirects=False)
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["items"]] == [prediction_id]


def test_an_idempotent_create_is_the_same_with_or_without_the_slash(api: Harness) -> None:
    headers = {"Idempotency-Key": "first-hour"}
    first = api.http.post("/v1/prediction/", json=api.body(), headers=headers)
    again = api.http.post("/v1/prediction", json=api.body(), headers=headers, follow_redirects=False)
    assert first.status_code == again.status_code == 200, again.text
    assert first.json()["predictionID"] == again.json()["predictionID"]


def test_each_operation_is_documented_once(api: Harness) -> None:
    schema = httpx.get(api.url + "/openapi.json").json()
    assert "/v1/prediction/" in schema["paths"] and "/v1/prediction" not in schema["paths"]
    operation_ids = [
        operation["operationId"]
        for operations in schema["paths"].values()
        for operation in operations.values()
    ]
    assert len(operation_ids) == len(set(operation_ids))


# --- a JSON body without Content-Type: application/json ------------------------------------

CREATES = [
    ("/v1/prediction/", "eachlabs"),
    ("/v1/prediction", "eachlabs"),
    ("/v1/prediction/run", "eachlabs"),
    ("/v1/predictions", "replicate"),
    (f"/v1/models/{MODEL}/predictions", "replicate"),
]


def create_body(route: str) -> dict[str, Any]:
    body: dict[str, Any] = {"input": {"redux_image": png_data_uri()}}
    if route.startswith("/v1/prediction/") or route == "/v1/prediction":
        body |= {"model": "flux-redux-schnell", "version": "0.0.1"}
    return body


@pytest.mark.parametrize(("route", "surface"), CREATES)
@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", None],
    ids=["curl-d", "text-plain", "no-content-type"],
)
def test_a_json_body_without_its_content_type_is_told_to_send_it(
    api: Harness, route: str, surface: str, content_type: str | None
) -> None:
    headers = {"Authorization": f"Bearer {api.key}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    # httpx adds no Content-Type to raw content: exactly what arrives is what is set here.
    response = httpx.post(
        api.url + route, content=json.dumps(create_body(route)), headers=headers, follow_redirects=False
    )
    assert response.status_code == 415, response.text
    error = response.json()
    assert error["code"] == "unsupported_media_type"
    assert error["header"] == "Content-Type"
    message = error["error"] if surface == "eachlabs" else error["detail"]
    assert "Content-Type: application/json" in message
    if surface == "replicate":
        assert error["status"] == 415 and error["title"] == "Unsupported Media Type"
    assert sum(api.services.store.counts_by_status().values()) == 0  # nothing was created


def test_json_with_a_charset_or_a_json_suffix_is_json(api: Harness) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = api.http.post(
            "/v1/prediction/", content=json.dumps(api.body()), headers={"Content-Type": content_type}
        )
        assert response.status_code == 200, (content_type, response.text)


def test_a_json_body_that_is_not_an_object_is_still_invalid_input(api: Harness) -> None:
    response = api.http.post("/v1/prediction/", json=["not", "an", "object"])
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"


def test_a_create_without_a_body_still_says_the_body_is_missing(api: Harness) -> None:
    response = api.http.post("/v1/prediction/")
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_input" and "body" in response.json()["error"]


def test_uploads_stay_multipart(api: Harness) -> None:
    data = base64.b64decode(png_data_uri().split(",", 1)[1])
    with bearer(api) as http:
        response = http.post("/v1/files", files={"content": ("ref.png", data, "image/png")})
    assert response.status_code in (200, 201), response.text
    assert response.json()["urls"]["get"]


def test_the_415_is_documented_on_the_json_routes(api: Harness) -> None:
    paths = httpx.get(api.url + "/openapi.json").json()["paths"]
    for route in (
        "/v1/prediction/",
        "/v1/prediction/run",
        "/v1/predictions",
        "/v1/models/{owner}/{name}/predictions",
    ):
        assert "415" in paths[route]["post"]["responses"], route
    assert "415" not in paths["/v1/files"]["post"]["responses"]  # multipart: no JSON to refuse


# --- an unknown model before its input -------------------------------------------------------


def test_an_unknown_model_is_a_404_even_with_a_bad_input(api: Harness) -> None:
    with bearer(api) as http:
        response = http.post("/v1/models/acme/other/predictions", json={"input": {"num_outputs": 99}})
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "unknown_model" and "acme/other" in response.json()["detail"]
        # The model's own name, with the same bad input: the input is what is wrong.
        known = http.post(f"/v1/models/{MODEL}/predictions", json={"input": {"num_outputs": 99}})
        assert known.status_code == 422 and known.json()["code"] == "invalid_input"


def test_a_version_naming_another_model_is_a_404_even_with_a_bad_input(api: Harness) -> None:
    with bearer(api) as http:
        for version in ("acme/other", "acme/other:abc123"):
            response = http.post("/v1/predictions", json={"version": version, "input": {"num_outputs": 99}})
            assert response.status_code == 404, response.text
            assert response.json()["code"] == "unknown_model" and "acme/other" in response.json()["detail"]
        # A plain version id names no model: the input is checked.
        plain = http.post("/v1/predictions", json={"version": "abc123", "input": {"num_outputs": 99}})
        assert plain.status_code == 422 and plain.json()["code"] == "invalid_input"


def test_an_unknown_model_still_needs_a_key(api: Harness) -> None:
    response = httpx.post(api.url + "/v1/models/acme/other/predictions", json={"input": {}})
    assert response.status_code == 401


# --- a missing S3 bucket in the log ----------------------------------------------------------


def test_a_missing_bucket_is_one_line_per_maintenance_round(tmp_path: Path, s3_env: str) -> None:
    bucket = f"missing-{secrets.token_hex(4)}"
    lease = 1.5  # maintenance runs every lease/3 seconds: 0.5 s
    env = {
        "FLUXREDUX_STORAGE": f"s3://{bucket}/files",
        "FLUXREDUX_LEASE_SECONDS": str(lease),
        "FLUXREDUX_HEARTBEAT_SECONDS": "0.5",
    }
    advice = (
        f"storage: the S3 bucket '{bucket}' does not exist at {s3_env}; "
        f"create it (aws s3 mb s3://{bucket} --endpoint-url {s3_env})"
    )

    def said() -> str:  # the log with rich's line wrapping undone
        return re.sub(r"\s+", " ", server.text())

    started = time.monotonic()
    with serve(tmp_path, env=env) as server:
        server.wait_for(lambda: said().count(advice) >= 4, 60, "the missing bucket was not reported")
        elapsed = time.monotonic() - started
        log = server.text()
    assert "Traceback" not in log, log[-3000:]
    # One line a round at most: no more of them than rounds could have run (and a round
    # says it once, not once per failed call).
    rounds = elapsed / (lease / 3) + 1
    assert said().count(advice) <= rounds, log[-3000:]


def test_a_missing_bucket_is_told_to_the_operator_not_to_callers(s3_env: str) -> None:
    bucket = f"missing-{secrets.token_hex(4)}"
    store = S3BlobStore(bucket, "files")
    with pytest.raises(BlobStoreError) as raised:
        list(store.list())
    assert raised.value.for_operator == (
        f"storage: the S3 bucket '{bucket}' does not exist at {s3_env}; "
        f"create it (aws s3 mb s3://{bucket} --endpoint-url {s3_env})"
    )
    # What a caller may see (a 503's body, /ready's reasons) names no bucket and no endpoint.
    assert bucket not in raised.value.message and s3_env not in raised.value.message


def test_on_aws_the_command_needs_no_endpoint() -> None:
    advice = for_operator("cannot be listed", "NoSuchBucket", "b-1", "https://s3.eu-west-1.amazonaws.com")
    assert advice.endswith("create it (aws s3 mb s3://b-1)")
