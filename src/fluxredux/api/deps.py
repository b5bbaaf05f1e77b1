"""Request dependencies: the services, the caller's API key, the links' base URL.

Every dependency here is ``async def``. FastAPI runs a plain (``def``) one in a worker
thread of its own (anyio's), a hand-over between threads that costs more than the work of
most of them: those that only look at the request run on the event loop; those that read
the stores (a key lookup, a read counted in Redis) go through ``Services.read``: on the
loop where the store answers at once (SQLite), else in one thread hop (a read's key check
and its count together).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from fluxredux.access.keys import ApiKey
from fluxredux.api.services import Services
from fluxredux.errors import StoreUnavailable, Unauthorized


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def presented_key(x_api_key: str | None = None, authorization: str | None = None) -> str | None:
    """The key as the caller sent it: X-API-Key (Eachlabs), or Authorization: Bearer (Replicate)."""
    if not x_api_key and authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key


async def _presented_key(
    x_api_key: Annotated[str | None, Header(description="Your API key.")] = None,
    authorization: Annotated[str | None, Header(description="Or: Bearer <API key>.")] = None,
) -> str | None:
    return presented_key(x_api_key, authorization)


PresentedKeyDep = Annotated[str | None, Depends(_presented_key)]


def verified_key(services: Services, presented: str | None) -> ApiKey:
    """The presented key's record, or Unauthorized. Blocking (the key store): in a thread."""
    try:
        return services.keys.verify(presented)
    except Unauthorized:
        # The key may well have been valid, and Redis restarted empty: then say that (a 503
        # the operator can act on), not "unknown key" to every caller. One read, on this
        # path only.
        if (lost := services.backends.lost_data()) is not None:
            raise StoreUnavailable(lost, retry_after=30) from None
        raise


async def get_api_key(services: ServicesDep, presented: PresentedKeyDep) -> ApiKey:

    return await services.read(verified_key, services, presented)


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def counted_read(services: Services, presented: str | None) -> ApiKey:
    """The caller's key, its read counted against the read limit (429 when over). Blocking:
    with Redis, checking the key and counting are network calls that must never hold up
    the event loop."""
    key = verified_key(services, presented)
    services.reads.hit(key.id, "reads")
    return key


async def count_read(services: ServicesDep, presented: PresentedKeyDep) -> ApiKey:

    return await services.read(counted_read, services, presented)


# The caller's key, for routes whose requests count as reads (polls, lists, uploads, shares).
ReaderKeyDep = Annotated[ApiKey, Depends(count_read)]


async def base_url(request: Request) -> str:
    services: Services = request.app.state.services
    return (services.settings.public_url or str(request.base_url)).rstrip("/")


BaseUrlDep = Annotated[str, Depends(base_url)]
