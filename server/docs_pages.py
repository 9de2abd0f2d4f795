"""The API docs page, Swagger UI at `/docs`, with every file it loads served by this server (from the
installed `fastapi-swagger` package and `static/`), so that it works offline and under a strict CSP."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from html import escape
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from fastapi.responses import Response

DOCS_URL = "/docs"
FAVICON_URL = "/favicon.ico"
SWAGGER_UI = resources.files("fastapi_swagger") / "resources"
STATIC = resources.files("monaserve.server") / "static"
JAVASCRIPT = "text/javascript; charset=utf-8"

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""The page runs only scripts from this server (no inline script: its start-up is a file) and calls only this server;
Swagger UI's icons are `data:` images, an image answer is shown from a `blob:`, and it sets inline styles."""
ASSET_HEADERS = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
"""An asset's URL names its content's hash, so a browser may keep it for good."""


@dataclass(frozen=True)
class Asset:
    """One file the page loads: its bytes, content type and URL (`/docs/<name>.<hash>.<ext>`)."""

    url: str
    body: bytes
    media_type: str


def asset(source: Traversable, media_type: str) -> Asset:
    """`source` as an asset, its URL named by a hash of its bytes."""
    body = source.read_bytes()
    stem, _, ext = source.name.rpartition(".")
    return Asset(f"{DOCS_URL}/{stem}.{hashlib.sha256(body).hexdigest()[:16]}.{ext}", body, media_type)


def docs_page(title: str, openapi_url: str, css: Asset, scripts: list[Asset]) -> bytes:
    """The HTML of `/docs`: Swagger UI's stylesheet and scripts, and where the start-up script finds the OpenAPI document."""
    tags = "\n".join(f'<script src="{escape(script.url)}"></script>' for script in scripts)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} - Swagger UI</title>
<link rel="icon" href="{FAVICON_URL}">
<link rel="stylesheet" href="{escape(css.url)}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{escape(openapi_url)}"></div>
{tags}
</body>
</html>
""".encode()


def constant(body: bytes, media_type: str, headers: dict[str, str]) -> Callable[[], Awaitable[Response]]:
    """An endpoint that answers `body`, always the same."""

    async def endpoint() -> Response:
        return Response(body, media_type=media_type, headers=headers)

    return endpoint


def docs_router(title: str, openapi_url: str) -> APIRouter:
    """`/docs` and one fixed route per asset (no route takes a path: a client names no file), all public."""
    css = asset(SWAGGER_UI / "swagger-ui.css", "text/css; charset=utf-8")
    scripts = [asset(SWAGGER_UI / "swagger-ui-bundle.js", JAVASCRIPT), asset(STATIC / "docs-init.js", JAVASCRIPT)]
    router = APIRouter()
    page = docs_page(title, openapi_url, css, scripts)
    router.add_api_route(DOCS_URL, constant(page, "text/html; charset=utf-8", PAGE_HEADERS), methods=["GET"], include_in_schema=False)
    for item in [css, *scripts]:
        router.add_api_route(item.url, constant(item.body, item.media_type, ASSET_HEADERS), methods=["GET"], include_in_schema=False)
    return router
