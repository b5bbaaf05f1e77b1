"""What a hostile or broken client can do to the server, and what it must not achieve:
unbounded fields, slow requests, links out of the files directory, open metrics,
undocumented statuses (with a schemathesis run over the whole API), and noise at load."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fluxredux.api.errors import ErrorBody
from fluxredux.config import Settings, is_loopback
from fluxredux.errors import NotFound
from fluxredux.storage import BlobNotFound, LocalBlobStore, new_key
from tests.harness import Harness, free_port, png_data_uri, running_server
from tests.helpers import FLUXREDUX

HUGE = 30 * 1024 * 1024  # the review's 30 MB values
SMALL_BODY = 2_000  # an error answer about one bad value stays this small


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, run_worker=False) as harness:
        yield harness


# --- 1. unbounded fields ------------------------------------------------------------


@pytest.mark.parametrize("field", ["version", "model"])
def test_a_30_mb_top_level_string_is_a_small_400_naming_the_field(api: Harness, field: str) -> None:
    body = api.body() | {field: "v" * HUGE}
    response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    assert len(response.content) < SMALL_BODY
    error = response.json()
    assert error["code"] == "invalid_input"
    assert error["fields"][0]["field"] == field
    assert field in error["error"]
    assert sum(api.services.store.counts_by_status().values()) == 0  # nothing stored


def test_a_30_mb_unknown_key_is_named_by_a_prefix(api: Harness) -> None:
    body = api.body()
    body["input"]["k" * HUGE] = 1
    response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    assert len(response.content) < SMALL_BODY
    error = response.json()
    assert "unknown field 'input.kkkk" in error["error"]
    assert f"({HUGE:,} characters)" in error["error"]


def test_200_000_unknown_keys_are_one_short_answer(api: Harness) -> None:
    body = api.body() | {f"k{i}": 1 for i in range(200_000)}
    response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    assert len(response.content) < 10_000
    error = response.json()
    assert len(error["fields"]) == 20
    assert error["error"].endswith("; and 199,980 more")


def test_an_image_url_is_bounded_but_a_data_uri_is_not(api: Harness) -> None:
    body = api.body()
    body["input"]["redux_image"] = "https://example.com/" + "a" * 100_000
    response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    assert len(response.content) < SMALL_BODY
    assert response.json()["code"] == "invalid_input"
    assert "input.redux_image: a URL must be at most 8,192 characters" in response.json()["error"]
    assert api.http.post("/v1/prediction/", json=api.body()).status_code == 200  # a data: URI is fine


def test_a_long_cursor_is_refused_without_being_echoed(api: Harness) -> None:
    response = api.http.get("/v1/prediction/", params={"cursor": "c" * 10_000})
    assert response.status_code == 400
    assert len(response.content) < SMALL_BODY
    assert response.json()["fields"][0]["field"] == "query.cursor"


def test_a_long_id_in_the_path_is_echoed_only_as_a_prefix(api: Harness) -> None:
    response = api.http.get("/v1/prediction/" + "i" * 12_000)
    assert response.status_code == 404
    assert len(response.content) < 4_000
    assert response.json()["code"] == "not_found"


def test_domain_error_details_are_cut_short() -> None:
    from fluxredux.api.errors import error_body

    body = error_body(NotFound("no prediction with id '" + "x" * 100_000 + "'", id="x" * 100_000))
    assert len(json.dumps(body)) < 3_000
    assert body["id"].startswith("xxxx") and body["id"].endswith("(100,000 characters)")


# --- 3. no file serving through links -------------------------------------------------


def test_file_store_serves_regular_files_inside_its_root_only(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "files")
    name = new_key("png")
    store.put(name, b"image", "image/png")
    assert store.exists(name) and store.get(name) == b"image"
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    links = {
        "AAAAAAAAAAAAAAAAAAAAAA.png": Path("/etc/passwd"),
        "BBBBBBBBBBBBBBBBBBBBBB.png": outside,
        "CCCCCCCCCCCCCCCCCCCCCC.png": Path("../secret.png"),  # relative, out of the root
        "DDDDDDDDDDDDDDDDDDDDDD.png": tmp_path / "missing.png",  # dangling
        "EEEEEEEEEEEEEEEEEEEEEE.png": Path("EEEEEEEEEEEEEEEEEEEEEE.png"),  # a loop
    }
    for link, target in links.items():
        (store.root / link).symlink_to(target)
        assert not store.exists(link), link
        with pytest.raises(BlobNotFound):
            store.open(link)
    (store.root / "FFFFFFFFFFFFFFFFFFFFFF.png").mkdir()  # not a regular file
    os.mkfifo(store.root / "GGGGGGGGGGGGGGGGGGGGGG.png")  # nor is a FIFO (nor may it block the read)
    for other in ("FFFFFFFFFFFFFFFFFFFFFF.png", "GGGGGGGGGGGGGGGGGGGGGG.png"):
        assert not store.exists(other)
        with pytest.raises(BlobNotFound):
            store.get(other)
    with pytest.raises(BlobNotFound):
        store.get("AAAAAAAAAAAAAAAAAAAAAA.png")
    assert [blob.key for blob in store.list()] == [name]
    store.delete(links)  # links are not blobs: not followed, not removed
    assert (store.root / "BBBBBBBBBBBBBBBBBBBBBB.png").is_symlink() and outside.read_bytes() == b"secret"


def test_a_link_in_the_files_dir_is_a_404(api: Harness) -> None:
    (api.services.settings.files_dir / "AAAAAAAAAAAAAAAAAAAAAA.png").symlink_to("/etc/passwd")
    response = httpx.get(f"{api.url}/files/AAAAAAAAAAAAAAAAAAAAAA.png")
    assert response.status_code == 404
    assert b"root:" not in response.content


# --- 4. /metrics access ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "access", "policy"),
    [
        ("127.0.0.1", "auto", "open"),
        ("127.0.0.2", "auto", "open"),
        ("::1", "auto", "open"),
        ("localhost", "auto", "open"),
        ("0.0.0.0", "auto", "key"),
        ("::", "auto", "key"),
        ("192.168.1.10", "auto", "key"),
        ("redux.example.com", "auto", "key"),
        ("0.0.0.0", "open", "open"),
        ("127.0.0.1", "off", "off"),
        ("127.0.0.1", "key", "key"),
    ],
)
def test_metrics_policy(host: str, access: str, policy: str) -> None:
    assert Settings(host=host, metrics_access=access).metrics_policy == policy


def test_loopback() -> None:
    assert is_loopback("127.8.9.10") and is_loopback("[::1]") and is_loopback("LOCALHOST")
    assert not is_loopback("") and not is_loopback("10.0.0.1")


def test_metrics_open_on_loopback_by_default(api: Harness) -> None:
    assert httpx.get(api.url + "/metrics").status_code == 200


def test_metrics_with_a_key(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False, metrics_access="key") as api:
        refused = httpx.get(api.url + "/metrics")
        assert (refused.status_code, refused.json()["code"]) == (401, "unauthorized")
        assert httpx.get(api.url + "/metrics", headers={"X-API-Key": "fr_x_y"}).status_code == 401
        assert api.http.get("/metrics").status_code == 200  # the harness client sends its key
        bearer = httpx.get(api.url + "/metrics", headers={"Authorization": f"Bearer {api.key}"})
        assert bearer.status_code == 200 and "fluxredux" in bearer.text


def test_metrics_off(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False, metrics_access="off") as api:
        response = api.http.get("/metrics")
        assert (response.status_code, response.json()["code"]) == (404, "not_found")


# --- 5. 405 says what is allowed ------------------------------------------------------


def test_405_has_an_allow_header(api: Harness) -> None:
    response = api.http.put("/health")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]


# --- 6. every status is documented ------------------------------------------------------


def test_openapi_documents_the_error_statuses_with_the_error_body(api: Harness) -> None:
    schema = api.http.get("/openapi.json").json()
    operations = {
        (method.upper(), path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    text = json.dumps(schema)
    assert "HTTPValidationError" not in text
    for (_method, path), operation in operations.items():
        # The Eachlabs surface answers invalid input with 400, the Replicate one with 422.
        replicate = path.startswith(("/v1/predictions", "/v1/models/", "/v1/files/", "/v1/webhooks/"))
        assert ("422" in operation["responses"]) == replicate, path
    expected = {
        ("POST", "/v1/prediction/"): {"400", "401", "413", "429", "503"},
        ("POST", "/v1/prediction/run"): {"400", "401", "413", "429", "503"},
        ("GET", "/v1/prediction/"): {"400", "401", "429"},
        ("GET", "/v1/prediction/{prediction_id}"): {"400", "401", "404", "429"},
        ("POST", "/v1/prediction/{prediction_id}/cancel"): {"401", "404", "429"},
        ("POST", "/v1/files"): {"400", "401", "413", "429"},
        ("GET", "/files/{name}"): {"404"},
        ("GET", "/metrics"): {"401", "404"},
    }
    for key, statuses in expected.items():
        responses = operations[key]["responses"]
        assert statuses <= set(responses), (key, sorted(responses))
        for status in statuses:
            content = responses[status]["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/ErrorBody"}, (key, status)
    replicate_expected = {
        ("POST", "/v1/models/{owner}/{name}/predictions"): {"401", "404", "409", "413", "422", "429", "503"},
        ("POST", "/v1/predictions"): {"401", "409", "413", "422", "429", "503"},
        ("GET", "/v1/predictions"): {"401", "422", "429"},
        ("GET", "/v1/predictions/{prediction_id}"): {"401", "404", "429"},
        ("POST", "/v1/predictions/{prediction_id}/cancel"): {"401", "404", "429"},
        ("GET", "/v1/files/{file_id}"): {"401", "404", "429"},
        ("DELETE", "/v1/files/{file_id}"): {"401", "404", "429"},
    }
    for key, statuses in replicate_expected.items():
        responses = operations[key]["responses"]
        assert statuses <= set(responses), (key, sorted(responses))
        for status in statuses:
            content = responses[status]["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/Problem"}, (key, status)
    for status in ("429", "503"):
        assert "Retry-After" in operations["POST", "/v1/prediction/"]["responses"][status]["headers"]
    error_schema = schema["components"]["schemas"]["ErrorBody"]
    assert {"error", "code"} <= set(error_schema["required"])
    assert set(ErrorBody.model_fields) <= set(error_schema["properties"])


# --- 2. slow requests are timed out -------------------------------------------------------


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    port: int

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from now)."""
    started = time.monotonic()
    received = b""
    sock.settimeout(limit)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started


@pytest.fixture(scope="module")
def slow_limits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A real `fluxredux serve` (fake model) with short limits, set as a user sets them."""
    port = free_port()
    data = tmp_path_factory.mktemp("slow-limits")
    env = {
        **os.environ,
        "FLUXREDUX_HEADER_TIMEOUT_SECONDS": "1",
        "FLUXREDUX_BODY_TIMEOUT_SECONDS": "1.5",
        "FLUXREDUX_BODY_MIN_BYTES_PER_SECOND": "1000",
    }
    log = (data / "serve.log").open("wb")
    process = subprocess.Popen(
        [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(data), "--model", "fake"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (data / "serve.log").read_text()
            assert time.monotonic() < deadline, (data / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield ServeProcess(process, port)
    finally:
        process.terminate()
        process.wait(15)
        log.close()


def trickle(sock: socket.socket, first: bytes, piece: bytes, every: float) -> tuple[bytes, float]:
    """Send ``first``, then ``piece`` every ``every`` seconds until the server answers or
    closes (at most 20 s); what it sent, and after how many seconds it started to."""
    sock.sendall(first)
    started = time.monotonic()
    while time.monotonic() - started < 20:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
        try:
            sock.sendall(piece)
        except OSError:
            break
    elapsed = time.monotonic() - started
    received, _ = read_until_closed(sock, 5)
    return received, elapsed


def test_trickled_headers_are_cut_off_with_a_408(slow_limits_server: ServeProcess) -> None:
    with slow_limits_server.connect() as sock:
        received, elapsed = trickle(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n", 0.2)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in received
    assert 0.9 < elapsed < 3


def test_a_silent_connection_is_closed(slow_limits_server: ServeProcess) -> None:
    with slow_limits_server.connect() as sock:
        received, elapsed = read_until_closed(sock, 10)
    assert received == b""  # no request, nothing to answer
    assert 0.9 < elapsed < 3


def test_a_trickled_body_is_cut_off_with_a_408(slow_limits_server: ServeProcess) -> None:
    head = (
        b"POST /v1/prediction/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    with slow_limits_server.connect() as sock:
        received, elapsed = trickle(sock, head, b" ", 0.2)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert 1.4 < elapsed < 4


def test_a_slow_but_steady_body_and_a_normal_client_are_unaffected(slow_limits_server: ServeProcess) -> None:
    body = json.dumps({"model": "flux-redux-schnell", "input": {"redux_image": "x" * 5000}}).encode()
    with slow_limits_server.connect() as sock:
        sock.sendall(
            b"POST /v1/prediction/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        # 2,000 bytes a second for ~2.6 s: over the 1.5 s body limit, but above the minimum rate.
        for start in range(0, len(body), 500):
            sock.sendall(body[start : start + 500])
            time.sleep(0.25)
        sock.settimeout(5)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 ")  # the request arrived whole; it has no key
        # The same connection, idle longer than the header limit (keep-alive is 5 s): still usable.
        time.sleep(1.5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert httpx.get(f"http://127.0.0.1:{slow_limits_server.port}/health").status_code == 200


# --- 7. schemathesis over the whole API -----------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_undocumented_status(tmp_path: Path) -> None:
    """Every operation of /openapi.json, with generated valid and invalid requests (fixed
    seed, bounded examples, no shrinking): no 5xx, every status documented, every JSON body
    as documented. Some requests carry a real image or a real prediction's id, so success
    paths are reached too, not only refusals."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    overrides = {
        "fetch_timeout_seconds": 1.0,
        "rate_limit_per_minute": 10_000,
        "read_limit_per_minute": 100_000,
    }
    with running_server(tmp_path, **overrides) as api:
        done = api.get(api.create_id(), wait=10)
        assert done["status"] == "success"
        known = {"prediction_id": done["id"], "name": done["output"].rsplit("/", 1)[1]}
        schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
        failures: list[str] = []
        for result in schema.get_all_operations():
            operation = result.ok()
            strategies = [
                operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            ]
            fixed = {name: value for name, value in known.items() if "{" + name + "}" in operation.path}
            if fixed:
                strategies.append(operation.as_strategy(path_parameters=fixed))

            @seed(20240607)
            @settings(
                max_examples=50,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
                suppress_health_check=list(HealthCheck),
            )
            @given(case=st.one_of(strategies), real_image=st.booleans())
            def check(case: schemathesis.Case, real_image: bool) -> None:
                if real_image and isinstance(case.body, dict) and isinstance(case.body.get("input"), dict):
                    case.body["input"]["redux_image"] = png_data_uri()
                case.call_and_validate(
                    base_url=api.url, headers={"X-API-Key": api.key}, timeout=10, checks=checks
                )

            try:
                check()
            except (Exception, FailureGroup) as exc:  # one operation's failure must not hide the others'
                failures.append(f"{operation.label}: {exc}")
        assert not failures, "\n\n".join(failures)


# --- 8. a model load says only what matters -------------------------------------------------


def test_loading_the_model_warns_about_no_missing_torchvision(model_cache_dir: Path) -> None:
    """transformers warns when a torchvision-backed image processor name is looked up
    without torchvision; the load path must not look any up. Shown here with transformers'
    own logging at WARNING (the CLI hides it unless --verbose; library users see it)."""
    code = (
        "import logging, sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from fluxredux.config import Settings\n"
        "from fluxredux.pipeline.loading import load_model\n"
        f"model = load_model(Settings(model='demo', cache_dir={str(model_cache_dir)!r}))\n"
        "print('loaded', model.info.kind)\n"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded demo"
    assert "torchvision" not in result.stderr, result.stderr
    assert "ImageProcessor" not in result.stderr, result.stderr
