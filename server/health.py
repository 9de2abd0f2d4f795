"""Health, metrics and the playground page: the routes load balancers, Prometheus and people open."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .runtime import AnyRuntime
from .schemas import Health


def page_headers(page: bytes) -> dict[str, str]:
    """Security headers for the playground: only its own inline script (by hash) runs, only same-origin fetches."""
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    return {
        "Content-Security-Policy": f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


FAVICON_HEADERS = {
    "Cache-Control": "public, max-age=604800",  # a week: the icon changes with releases, not requests
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",  # opened on its own, the SVG runs nothing
    "X-Content-Type-Options": "nosniff",
}


class HealthEndpoints:
    """Liveness, readiness (with what the server is doing), Prometheus metrics and the playground."""

    def __init__(self, runtime: AnyRuntime) -> None:
        self.runtime = runtime
        self.page = (resources.files("monaserve.server") / "static" / "playground.html").read_bytes()
        self.page_headers = page_headers(self.page)
        self.favicon_svg = (resources.files("monaserve.server") / "static" / "favicon.svg").read_bytes()

    async def live(self) -> Health:
        return Health(status="alive")

    async def ready(self) -> Response:
        """200 once ready; else 503 with the state, and while loading what start-up does (the demo's training, say)."""
        runtime = self.runtime
        if runtime.ready:
            return JSONResponse(Health(status="ready").model_dump(exclude_none=True))
        progress = runtime.progress.to_json() if runtime.state == "loading" else {}
        return JSONResponse(Health(status=runtime.state, detail=runtime.error, **progress).model_dump(exclude_none=True), status_code=503)

    async def metrics(self) -> Response:
        return Response(self.runtime.metrics.render(), media_type="text/plain; version=0.0.4")

    async def playground(self) -> Response:
        """Pick a task, drop an image, see the result drawn (plain HTML and JS, same origin)."""
        return Response(self.page, media_type="text/html; charset=utf-8", headers=self.page_headers)

    async def favicon(self) -> Response:
        """The icon of the playground and the API docs, an SVG (browsers ask for /favicon.ico whatever it holds)."""
        return Response(self.favicon_svg, media_type="image/svg+xml", headers=FAVICON_HEADERS)


def health_router(runtime: AnyRuntime) -> APIRouter:
    """`/health/live`, `/health/ready`, `/metrics`, the playground at `/` and its icon (no token: probes and browsers call them)."""
    endpoints = HealthEndpoints(runtime)
    router = APIRouter()
    router.add_api_route(
        "/health/live", endpoints.live, methods=["GET"], response_model=Health, response_model_exclude_none=True, tags=["health"]
    )
    router.add_api_route(
        "/health/ready", endpoints.ready, methods=["GET"], response_model=Health, responses={503: {"model": Health}}, tags=["health"]
    )
    router.add_api_route("/metrics", endpoints.metrics, methods=["GET"], response_class=Response, tags=["health"])
    router.add_api_route("/", endpoints.playground, methods=["GET"], include_in_schema=False)
    router.add_api_route("/favicon.ico", endpoints.favicon, methods=["GET"], include_in_schema=False)
    return router
