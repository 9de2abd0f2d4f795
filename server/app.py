"""The HTTP app, assembled in small named steps: error handlers, middleware, then the routers over one data plane.

The request path, outermost first: `http_protocol.ConnectionGuard` (connection limits, timeouts) ->
the middleware added here (error containment, body guard, CORS) -> a router
(`rest_v1`, `admin_v1`, `oip`, `health`) that translates its protocol -> `dataplane.DataPlane` ->
`decoding.Decoder` and `engine_client.LocalEngine` (registry lease, scheduler, engine) -> the kind's
post-process -> back through the router's renderer.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from monaserve.adapters.package import MAX_PACKAGE_BYTES

from .admin_v1 import ADMIN_PREFIX, admin_router
from .auth import admin_guard, api_guard
from .budgets import BodyBudget
from .config import REPLICA_HEADER, ServeConfig
from .dataplane import DataPlane
from .health import health_router
from .http_errors import install_error_handlers
from .middleware import BodyGuard, BodyRules, ContainErrors
from .oip import oip_router
from .oip_codec import HEADER_LENGTH
from .rest_v1 import inference_router
from .runtime import Runtime

MiB = 2**20


def _lifespan(runtime: Runtime):
    """Start the runtime in the background (the app answers health probes while the backbone loads); drain on exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = asyncio.create_task(runtime.start())
        yield
        if not start.done():
            start.cancel()
        await runtime.stop()

    return lifespan


def _add_middlewares(app: FastAPI, config: ServeConfig) -> None:
    """The middleware stack, added innermost first: CORS (when asked for), the body guard, and outermost
    error containment. (The replica header is a default header of uvicorn's, so a contained error has it
    too; the connection guards add it to their own answers.)"""
    origins = [o.strip() for o in config.cors_origins.split(",") if o.strip()]
    if origins:  # off by default: browsers then refuse cross-origin calls
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", HEADER_LENGTH],
            expose_headers=[REPLICA_HEADER, HEADER_LENGTH],
        )
    rules = BodyRules(
        default_limit=int(config.max_request_mb * MiB),
        upload_limit=MAX_PACKAGE_BYTES + MiB,
        upload_prefix=ADMIN_PREFIX,
        timeout_s=config.body_timeout_s,
        min_rate=config.body_min_rate,
    )
    budget = BodyBudget(int(config.max_body_buffer_mb * MiB), "--max-body-buffer-mb")
    upload_budget = BodyBudget(rules.upload_limit, "one package upload at a time")
    app.add_middleware(BodyGuard, rules=rules, budget=budget, upload_budget=upload_budget)
    app.add_middleware(ContainErrors)


def _register_routes(app: FastAPI, plane: DataPlane, config: ServeConfig) -> None:
    """Every route, by protocol; tokens are checked by each router's dependencies."""
    require_api, require_admin = api_guard(config), admin_guard(config)
    app.include_router(inference_router(plane, require_api))
    app.include_router(admin_router(plane, require_admin))
    app.include_router(oip_router(plane, require_api, require_admin))
    app.include_router(health_router(plane.runtime))


def create_app(runtime: Runtime) -> FastAPI:
    """The ASGI app over `runtime` (whose start-up runs in the app's lifespan)."""
    app = FastAPI(
        title="monaserve",
        summary="One frozen Swin backbone, many Mona-adapted tasks.",
        version="0.1.0",
        lifespan=_lifespan(runtime),
        redirect_slashes=False,  # a redirect would echo the Host header back, before any auth
    )
    install_error_handlers(app)
    _add_middlewares(app, runtime.config)
    _register_routes(app, DataPlane(runtime), runtime.config)
    return app
