"""The HTTP app, assembled in small named steps: error handlers, middleware, then the routers over one data plane.

The request path, outermost first: `http_protocol.ConnectionGuard` (connection limits, timeouts) ->
the middleware added here (request counts, error containment, body guard, CORS) -> a router
(`rest_v1`, `admin_v1`, `oip`, `health`) that translates its protocol -> `dataplane.DataPlane` ->
`decoding.Decoder` and the `engine_client.EngineClient`: `LocalEngine` (registry lease, scheduler,
engine), or under `--workers` `remote_engine.RemoteEngine` (shared memory and a socket to the engine
process, where a `LocalEngine` runs it) -> the kind's post-process -> back through the router's renderer.
In a front-end process, admin calls leave the stack at `forward.ForwardToEngine` for the engine process.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from monaserve.adapters.package import MAX_PACKAGE_BYTES

from .admin_v1 import ADMIN_PREFIX, admin_router
from .auth import admin_guard, api_guard
from .budgets import BodyBudget
from .config import REPLICA_HEADER, ServeConfig
from .dataplane import DataPlane
from .docs_pages import docs_router
from .forward import ForwardToEngine
from .grpc_server import GrpcServer
from .health import health_router
from .http_errors import install_error_handlers
from .middleware import BodyGuard, BodyRules, ContainErrors, CountRequests
from .oip import oip_router
from .oip_codec import HEADER_LENGTH
from .oip_schemas import body_components
from .rest_v1 import inference_router
from .runtime import AnyRuntime

MiB = 2**20


def _lifespan(runtime: AnyRuntime, grpc: GrpcServer | None):
    """Start the runtime in the background (the app answers health probes while the backbone loads) and
    the gRPC server (it listens at once too); on exit, after HTTP has drained, gRPC drains, then the runtime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = asyncio.create_task(runtime.start())
        if grpc is not None:
            await grpc.start()
        yield
        if grpc is not None:
            await grpc.stop(runtime.config.request_timeout_s + 5)
        if not start.done():
            start.cancel()
        await runtime.stop()

    return lifespan


def _body_budget(runtime: AnyRuntime) -> BodyBudget:
    """Bytes of request bodies held at once, HTTP's and gRPC's together (--max-body-buffer-mb)."""
    return BodyBudget(int(runtime.config.max_body_buffer_mb * MiB), "--max-body-buffer-mb", runtime.new_tally())


def _add_middlewares(app: FastAPI, plane: DataPlane, budget: BodyBudget, admin_routes: list[APIRoute]) -> None:
    """The middleware stack, added innermost first: in a front-end process the admin routes' way to the
    engine process, CORS (when asked for), the body guard, error containment, and outermost the count
    of inference requests (which sees every answer, a contained error's too). (The replica
    header is a default header of uvicorn's, so a contained error has it too; the connection guards add
    it to their own answers.)"""
    runtime = plane.runtime
    config = runtime.config
    if runtime.admin_socket is not None:
        app.add_middleware(ForwardToEngine, socket_path=runtime.admin_socket, routes=admin_routes, config=config)
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
    upload_budget = BodyBudget(rules.upload_limit, "one package upload at a time", runtime.new_tally())
    app.add_middleware(BodyGuard, rules=rules, budget=budget, upload_budget=upload_budget)
    app.add_middleware(ContainErrors)
    app.add_middleware(CountRequests, count=plane.count_request)


def _register_routes(app: FastAPI, plane: DataPlane, config: ServeConfig) -> list[APIRoute]:
    """Every route, by protocol; tokens are checked by each router's dependencies. Returns the admin routes."""
    require_api, require_admin = api_guard(config), admin_guard(config)
    routers = [
        inference_router(plane, require_api),
        admin_router(plane, require_admin),
        oip_router(plane, require_api, require_admin),
        health_router(plane.runtime),
    ]
    for router in routers:
        app.include_router(router)
    return [
        route
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and any(d.call is require_admin for d in route.dependant.dependencies)
    ]


def _document_body_schemas(app: FastAPI) -> None:
    """Request bodies the routes parse themselves (the Open Inference Protocol's), as OpenAPI components
    their routes refer to, so that a generated client gets typed models."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            build().setdefault("components", {}).setdefault("schemas", {}).update(body_components())
        return app.openapi_schema

    app.openapi = openapi


def create_app(runtime: AnyRuntime, serve_grpc: bool = False) -> FastAPI:
    """The ASGI app over `runtime` (whose start-up runs in the app's lifespan), and with `serve_grpc` the
    gRPC server on `--grpc-port` (unless 0) over the same data plane."""
    plane, budget = DataPlane(runtime), _body_budget(runtime)
    grpc = GrpcServer(plane, budget) if serve_grpc and runtime.config.grpc_port else None
    app = FastAPI(
        title="monaserve",
        summary="One frozen Swin backbone, many Mona-adapted tasks.",
        version="0.1.0",
        lifespan=_lifespan(runtime, grpc),
        redirect_slashes=False,  # a redirect would echo the Host header back, before any auth
        docs_url=None,  # FastAPI's loads Swagger UI from a CDN: `docs_pages` serves it
        redoc_url=None,  # ReDoc too needs a CDN, and no licensed package ships it
    )
    install_error_handlers(app)
    admin_routes = _register_routes(app, plane, runtime.config)
    app.include_router(docs_router(app.title, app.openapi_url))
    _add_middlewares(app, plane, budget, admin_routes)
    _document_body_schemas(app)
    return app
