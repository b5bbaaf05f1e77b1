"""Fetching redux_image URLs: what is refused, why, and proof that nothing was contacted."""

from __future__ import annotations

import asyncio
import http.server
import io
import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from PIL import Image

from fluxredux.errors import FetchRefused
from fluxredux.net import FetchPolicy, IPAddress, SafeFetcher, address_kind


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class LocalServer:
    """A loopback HTTP server that records every request it gets."""

    host: str
    routes: dict[str, tuple[int, dict[str, str], bytes]]
    requests: list[str] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


@pytest.fixture
def serve_on() -> Iterator[object]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(host: str, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> LocalServer:
        record = LocalServer(host=host, routes=routes)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                record.requests.append(self.path)
                status, headers, body = record.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        record.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return record

    yield start
    for httpd in servers:
        httpd.shutdown()


class TestPublicHostPolicy(FetchPolicy):
    """127.0.0.2 plays a public host (tests may only reach loopback); 127.0.0.1 stays loopback."""

    __test__ = False

    def refusal(self, ip: IPAddress) -> str | None:
        return None if str(ip) == "127.0.0.2" else super().refusal(ip)


def fetch(url: str, policy: FetchPolicy | None = None, resolver: object = None) -> bytes:
    async def go() -> bytes:
        kwargs = {"resolver": resolver} if resolver else {}
        fetcher = SafeFetcher(policy or FetchPolicy(), **kwargs)  # type: ignore[arg-type]
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def refusal(url: str, **kwargs: object) -> FetchRefused:
    with pytest.raises(FetchRefused) as info:
        fetch(url, **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_loopback_is_refused_and_never_contacted(serve_on: object) -> None:
    server = serve_on("127.0.0.1", {"/a.png": (200, {}, png_bytes())})  # type: ignore[operator]
    error = refusal(server.url("/a.png"))
    assert error.code == "url_not_public"
    assert "127.0.0.1 (loopback address)" in error.message
    assert server.requests == []


def test_a_name_resolving_to_loopback_is_refused(serve_on: object) -> None:
    server = serve_on("127.0.0.1", {"/a.png": (200, {}, png_bytes())})  # type: ignore[operator]

    async def localhost_resolver(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("127.0.0.1")]

    url = f"http://innocent.example:{server.port}/a.png"
    error = refusal(url, resolver=localhost_resolver)
    assert "(loopback address)" in error.message  # every address counts, not just the first
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("http://10.0.0.7/x.png", "10.0.0.7 (private address)"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 (link-local address)"),
        ("http://[::1]:9/x.png", "::1 (loopback address)"),
        ("http://[::ffff:127.0.0.1]/x.png", "(loopback address)"),
        ("http://0.0.0.0/x.png", "0.0.0.0 (unspecified address)"),
    ],
)
def test_private_addresses_are_refused_with_the_reason(url: str, text: str) -> None:
    assert text in refusal(url).message


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", "url_scheme"),
        ("gopher://x/", "url_scheme"),
        ("http://u:p@example.com/", "url_credentials"),
    ],
)
def test_only_plain_http_urls(url: str, code: str) -> None:
    assert refusal(url).code == code


def test_a_public_looking_redirect_to_loopback_is_refused(serve_on: object) -> None:
    inside = serve_on("127.0.0.1", {"/secret": (200, {}, b"internal")})  # type: ignore[operator]
    outside = serve_on("127.0.0.2", {"/img": (302, {"Location": inside.url("/secret")}, b"")})  # type: ignore[operator]
    error = refusal(outside.url("/img"), policy=TestPublicHostPolicy())
    assert error.code == "url_not_public" and "loopback" in error.message
    assert outside.requests == ["/img"]
    assert inside.requests == []


def test_allowed_host_is_fetched_and_redirects_are_followed(serve_on: object) -> None:
    server = serve_on(  # type: ignore[operator]
        "127.0.0.2", {"/old": (301, {"Location": "/new.png"}, b""), "/new.png": (200, {}, png_bytes())}
    )
    assert fetch(server.url("/old"), policy=TestPublicHostPolicy()) == png_bytes()
    assert server.requests == ["/old", "/new.png"]


def test_redirect_loops_are_cut(serve_on: object) -> None:
    server = serve_on("127.0.0.2", {"/loop": (302, {"Location": "/loop"}, b"")})  # type: ignore[operator]
    assert refusal(server.url("/loop"), policy=TestPublicHostPolicy()).code == "url_redirects"
    assert len(server.requests) == 4  # the first request and 3 redirects


def test_size_is_capped_while_streaming(serve_on: object) -> None:
    server = serve_on("127.0.0.2", {"/big": (200, {}, b"x" * 50_000)})  # type: ignore[operator]
    policy = TestPublicHostPolicy(max_bytes=10_000)
    assert refusal(server.url("/big"), policy=policy).code == "image_too_large"


def test_http_errors_are_reported(serve_on: object) -> None:
    server = serve_on("127.0.0.2", {})  # type: ignore[operator]
    error = refusal(server.url("/missing.png"), policy=TestPublicHostPolicy())
    assert (error.code, error.detail["http_status"]) == ("url_http_error", 404)


def test_private_hosts_can_be_allowed_for_on_prem(serve_on: object) -> None:
    server = serve_on("127.0.0.1", {"/a.png": (200, {}, png_bytes())})  # type: ignore[operator]
    assert fetch(server.url("/a.png"), policy=FetchPolicy(allow_private=True)) == png_bytes()


def test_the_api_refuses_a_loopback_redux_image_with_the_reason(tmp_path: object, serve_on: object) -> None:
    from tests.harness import running_server

    server = serve_on("127.0.0.1", {"/a.png": (200, {}, png_bytes())})  # type: ignore[operator]
    with running_server(tmp_path, run_worker=False) as api:  # type: ignore[arg-type]
        body = api.body()
        body["input"]["redux_image"] = server.url("/a.png")
        response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    assert response.json()["code"] == "url_not_public"
    assert response.json()["field"] == "input.redux_image"
    assert response.json()["error"].startswith("input.redux_image: ")
    assert server.requests == []


def test_an_unusable_reference_among_several_is_named_by_its_place(tmp_path: object) -> None:
    from tests.harness import running_server
    from tests.helpers import png_data_uri

    with running_server(tmp_path, run_worker=False) as api:  # type: ignore[arg-type]
        body = api.body()
        del body["input"]["redux_image"]
        body["input"]["redux_images"] = [{"image": png_data_uri()}, {"image": "data:,"}]
        response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["field"]) == (
        "image_empty",
        "input.redux_images.1.image",
    )
