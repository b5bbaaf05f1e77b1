"""Fetching user-given URLs without becoming a proxy into the private network (SSRF).

Rules, for every hop (redirects included):
- http and https only, no credentials in the URL;
- every address the host resolves to must be public (no loopback, private, link-local,
  multicast, reserved, unspecified, shared or IPv4-mapped versions of those), unless
  the operator allows private hosts for on-prem use;
- the connection goes to the address that was checked (no second DNS lookup that an
  attacker could answer differently), with the original Host header and TLS name;
- redirects are followed by hand, re-checked, and limited; size and time are capped
  while streaming. Proxy settings from the environment are ignored on purpose.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from fluxredux.errors import FetchRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


def address_kind(ip: IPAddress) -> str | None:
    """Why an address is not public ("loopback", "private", ...), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return address_kind(ip.ipv4_mapped)
    # Most specific first: Python counts link-local and 0.0.0.0 as "private" too.
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-public"
    return None


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 25 * 1024 * 1024
    timeout: float = 20.0
    max_redirects: int = 3
    allow_private: bool = False

    def refusal(self, ip: IPAddress) -> str | None:
        if self.allow_private:
            return None
        return address_kind(ip)


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def check_url_shape(url: str) -> httpx.URL:
    """Scheme and form checks that need no network (also used for webhook URLs)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise FetchRefused("url_invalid", f"not a valid URL: {url[:200]}") from exc
    if parsed.scheme not in ("http", "https"):
        raise FetchRefused(
            "url_scheme", f"only http and https URLs are fetched, not {parsed.scheme or 'none'}"
        )
    if not parsed.host:
        raise FetchRefused("url_invalid", "the URL has no host")
    if parsed.userinfo:
        raise FetchRefused("url_credentials", "URLs with credentials (user:password@) are not fetched")
    return parsed


class SafeFetcher:
    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, transport=transport, timeout=policy.timeout
        )

    async def checked_address(self, url: httpx.URL) -> IPAddress:
        """Resolve and check every address of the URL's host; return one to connect to."""
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(url.host)
        except ValueError:
            literal = None
        try:
            addresses = [literal] if literal else await self.resolver(url.host, port)
        except OSError as exc:
            raise FetchRefused("url_dns", f"cannot resolve host {url.host}") from exc
        if not addresses:
            raise FetchRefused("url_dns", f"cannot resolve host {url.host}")
        for ip in addresses:
            kind = self.policy.refusal(ip)
            if kind:
                raise FetchRefused(
                    "url_not_public",
                    f"refused to fetch {url.host}: it resolves to {ip} ({kind} address)",
                    address=str(ip),
                )
        return addresses[0]

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.policy.timeout):
                return await self._fetch(url)
        except TimeoutError as exc:
            raise FetchRefused(
                "url_timeout", f"fetching the URL took longer than {self.policy.timeout:g} s"
            ) from exc

    async def _fetch(self, url: str) -> bytes:
        for _hop in range(self.policy.max_redirects + 1):
            parsed = check_url_shape(url)
            ip = await self.checked_address(parsed)
            host_header = parsed.netloc.decode("ascii")
            target = parsed.copy_with(host=str(ip))
            try:
                async with self._client.stream(
                    "GET",
                    target,
                    headers={"Host": host_header, "Accept": "image/*"},
                    extensions={"sni_hostname": parsed.host},
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(str(parsed), response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FetchRefused(
                            "url_http_error",
                            f"the image URL answered HTTP {response.status_code}",
                            http_status=response.status_code,
                        )
                    return await self._read_capped(response)
            except httpx.HTTPError as exc:
                raise FetchRefused(
                    "url_unreachable", f"could not fetch the image URL: {type(exc).__name__}"
                ) from exc
        raise FetchRefused("url_redirects", f"more than {self.policy.max_redirects} redirects")

    async def _read_capped(self, response: httpx.Response) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchRefused(
                "image_too_large", f"the image is {int(declared):,} bytes; the limit is {limit:,}"
            )
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise FetchRefused("image_too_large", f"the image is over the {limit:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self._client.aclose()
