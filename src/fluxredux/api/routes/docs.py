"""/docs (Swagger UI) and /redoc, served whole by this server.

FastAPI's own pages load their scripts and styles from a CDN, and show nothing on the
air-gapped GPU machines this server often runs on. These are the same pages (FastAPI's
HTML), pointing at the copies of the assets that the fastapi-offline package ships,
which app.py mounts at ``ASSETS_PATH``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

# swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png.
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS_PATH = "/docs/assets"

router = APIRouter(include_in_schema=False)

# What the pages may load: this server's own files only. The bundles name other hosts
# themselves (ReDoc's footer logo is an image on cdn.redoc.ly): the browser is told not to
# try them, so nothing leaves for the internet, and nothing waits on it when it is not there.
# Both pages start with an inline script or styles, and ReDoc searches in a blob: worker.
ONLY_THIS_SERVER = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "worker-src 'self' blob:",
    ]
)


def _page(generated: HTMLResponse) -> HTMLResponse:
    return HTMLResponse(bytes(generated.body), headers={"Content-Security-Policy": ONLY_THIS_SERVER})


def _prefix(request: Request) -> str:
    # Behind a proxy that serves the app under a path, the assets are under it too.
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    prefix = _prefix(request)
    return _page(
        get_swagger_ui_html(
            openapi_url=f"{prefix}{request.app.openapi_url}",
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{prefix}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{ASSETS_PATH}/favicon.png",
            # Swagger UI would otherwise send the schema's URL to validator.swagger.io for a
            # badge, from any page not on localhost.
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    prefix = _prefix(request)
    return _page(
        get_redoc_html(
            openapi_url=f"{prefix}{request.app.openapi_url}",
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{prefix}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{prefix}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,  # fonts.googleapis.com: another host
        )
    )
