"""Request dependencies: the services, the caller's API key, the links' base URL."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from fluxredux.access.keys import ApiKey
from fluxredux.api.services import Services
from fluxredux.errors import StoreUnavailable, Unauthorized


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def presented_key(
    x_api_key: Annotated[str | None, Header(description="Your API key.")] = None,
    authorization: Annotated[str | None, Header(description="Or: Bearer <API key>.")] = None,
) -> str | None:
    """The key as the caller sent it: X-API-Key (Eachlabs), or Authorization: Bearer (Replicate)."""
    if not x_api_key and authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key


PresentedKeyDep = Annotated[str | None, Depends(presented_key)]


def get_api_key(services: ServicesDep, presented: PresentedKeyDep) -> ApiKey:
    try:
        return services.keys.verify(presented)
    except Unauthorized:
        # The key may well have been valid, and Redis restarted empty: then say that (a 503
        # the operator can act on), not "unknown key" to every caller. One read, on this
        # path only (a thread: FastAPI runs plain dependencies off the event loop).
        if (lost := services.backends.lost_data()) is not None:
            raise StoreUnavailable(lost, retry_after=30) from None
        raise


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def count_read(services: ServicesDep, key: ApiKeyDep) -> ApiKey:
    """The caller's key, its read counted against the read limit (429 when over). A plain
    function, so FastAPI runs it in a thread: with Redis, counting is a network call that
    must never hold up the event loop."""
    services.reads.hit(key.id, "reads")
    return key


# The caller's key, for routes whose requests count as reads (polls, lists, uploads, shares).
ReaderKeyDep = Annotated[ApiKey, Depends(count_read)]


def base_url(request: Request) -> str:
    services: Services = request.app.state.services
    return (services.settings.public_url or str(request.base_url)).rstrip("/")


BaseUrlDep = Annotated[str, Depends(base_url)]
