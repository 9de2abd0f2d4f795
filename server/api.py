"""The HTTP API (FastAPI): inference, adapter management, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from monaserve.adapters.package import MAX_PACKAGE_BYTES

from . import postprocess
from .budgets import BodyBudget, ResponseBudget
from .disconnect import unless_client_leaves
from .errors import BadRequest, Forbidden, PayloadTooLarge, ResponseTooLarge, Unauthorized, UnsupportedMedia, status_of
from .http_errors import install_error_handlers
from .middleware import REPLICA_HEADER, BodyGuard, BodyRules, ContainErrors, ReplicaHeader
from .registry import TaskEntry
from .runtime import Inference, Runtime, ServeConfig
from .oip import oip_router
from .oip_codec import HEADER_LENGTH
from .schemas import (
    AdapterList,
    CacheView,
    ClassifyResponse,
    DetectResponse,
    DeviceView,
    ErrorBody,
    Health,
    ImagesRequest,
    Kind,
    LoadRequest,
    SegmentResponse,
    TaskInfo,
    TaskName,
    TaskView,
    Timings,
    UnloadResponse,
    VersionView,
)

log = logging.getLogger(__name__)


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
ADMIN_PREFIX = "/v1/adapters"
ERROR_RESPONSES = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 408, 409, 413, 415, 422, 503, 504, 507)}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["image"],
                }
            },
            "application/json": {"schema": ImagesRequest.model_json_schema()},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
PACKAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def check_bearer(authorization: str | None, tokens: list[str], what: str) -> None:
    """401 without a bearer token, 403 unless it equals one of `tokens` (constant-time comparisons)."""
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized(f"{what} need 'Authorization: Bearer <token>'")
    given = authorization.removeprefix("Bearer ").encode()
    if not any([hmac.compare_digest(given, token.encode()) for token in tokens]):  # a list: compare with every token
        raise Forbidden(f"invalid token for {what}")


async def read_images(request: Request, max_images: int) -> list[bytes]:
    """Image files from a multipart form (`image` fields), JSON base64 (`images`), or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
        files = [f for f in form.getlist("image") if not isinstance(f, str)]
        if not files:
            raise BadRequest("multipart body has no file in an 'image' field")
        if len(files) > max_images:
            raise PayloadTooLarge(f"{len(files)} images in one request; the limit is {max_images}")
        return [await f.read() for f in files]
    if content_type == "application/json":
        try:
            body = ImagesRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise BadRequest(f"invalid JSON body: {exc.errors(include_url=False)[0]['msg']} (expected {{\"images\": [base64, ...]}})") from None
        if len(body.images) > max_images:
            raise PayloadTooLarge(f"{len(body.images)} images in one request; the limit is {max_images}")
        images = []
        for i, encoded in enumerate(body.images):
            try:
                images.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}] is not valid base64") from None
        return images
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [await request.body()]
    raise UnsupportedMedia(
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data, application/json or an image"
    )


def render_results(task: str, result: Inference, top_k: int, min_score: float, rle: bool, budget: ResponseBudget) -> bytes:
    """The JSON answer of a /v1 inference request, no larger than `budget` allows."""
    manifest, pairs = result.manifest, list(zip(result.outputs, result.prepared))
    timings = Timings(**{f"{k}_ms": round(v * 1000, 3) for k, v in result.timings_s.items()})
    common = {"task": task, "version": result.version, "timings_ms": timings}
    if manifest.kind == "classify":
        response = ClassifyResponse(results=[postprocess.classify(o, manifest, top_k) for o, _ in pairs], **common)
    elif manifest.kind == "detect":
        response = DetectResponse(results=[postprocess.detect(o, manifest, p, min_score) for o, p in pairs], **common)
    else:
        response = SegmentResponse(results=[postprocess.segment(o, manifest, p, rle, budget) for o, p in pairs], **common)
    body = response.model_dump_json().encode()
    if len(body) > budget.limit:
        raise ResponseTooLarge(
            f"the answer would be {len(body)} bytes; the limit is {budget.limit} (--max-response-mb): send fewer images per request"
        )
    return body


def add_middleware(app: FastAPI, config: ServeConfig) -> None:
    """The middleware stack, added innermost first: CORS (when asked for), the body guard, error
    containment, and outermost the replica header, so even a contained error names its replica."""
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
        default_limit=int(config.max_request_mb * 2**20),
        upload_limit=MAX_PACKAGE_BYTES + 2**20,
        upload_prefix=ADMIN_PREFIX,
        timeout_s=config.body_timeout_s,
        min_rate=config.body_min_rate,
    )
    budget = BodyBudget(int(config.max_body_buffer_mb * 2**20), "--max-body-buffer-mb")
    upload_budget = BodyBudget(rules.upload_limit, "one package upload at a time")
    app.add_middleware(BodyGuard, rules=rules, budget=budget, upload_budget=upload_budget)
    app.add_middleware(ContainErrors)
    app.add_middleware(ReplicaHeader, replica=config.replica_id)


def create_app(runtime: Runtime) -> FastAPI:
    config = runtime.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = asyncio.create_task(runtime.start())
        yield
        if not start.done():
            start.cancel()
        await runtime.stop()

    app = FastAPI(
        title="monaserve",
        summary="One frozen Swin backbone, many Mona-adapted tasks.",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would echo the Host header back, before any auth
    )
    install_error_handlers(app)
    add_middleware(app, config)

    async def require_admin(authorization: str | None = Header(default=None)) -> None:
        token = config.admin_token
        if token is None:
            if config.insecure_admin:
                return
            raise Forbidden("the admin API is off: start the server with --admin-token (or MONASERVE_ADMIN_TOKEN)")
        check_bearer(authorization, [token], "admin routes")

    async def require_api(authorization: str | None = Header(default=None)) -> None:
        """With --api-token, inference needs it (or the admin token); without, inference is open."""
        if config.api_token is not None:
            check_bearer(authorization, [t for t in (config.api_token, config.admin_token) if t], "inference routes")

    api = [Depends(require_api)]

    def registry():
        runtime.require_ready()
        return runtime.registry

    # ---- inference -----------------------------------------------------------------------------

    @app.post(
        "/v1/tasks/{task}/{kind}",
        dependencies=api,
        response_model=ClassifyResponse | DetectResponse | SegmentResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=IMAGE_BODY,
        summary="Run images through a task",
        tags=["inference"],
    )
    async def infer(
        task: TaskName,
        kind: Kind,
        request: Request,
        version: int | None = Query(default=None, ge=1, description="pin an adapter version"),
        top_k: int = Query(default=5, ge=1, le=1000, description="classify: labels per image"),
        min_score: float = Query(default=0.0, ge=0.0, le=1.0, description="detect: drop boxes scoring less"),
        rle: bool = Query(default=False, description="segment: add per-class RLE"),
    ) -> Response:
        status = 500
        try:
            images = await read_images(request, config.max_images_per_request)
            result = await unless_client_leaves(request, runtime.infer(task, kind, images, version))
            budget = ResponseBudget(int(config.max_response_mb * 2**20))
            # mask resizing, PNG encoding and JSON are CPU work: keep them off the event loop
            body = await asyncio.get_running_loop().run_in_executor(
                runtime.decode_pool, render_results, task, result, top_k, min_score, rle, budget
            )
            status = 200
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            if runtime.registry is not None and task in runtime.registry.catalog:
                runtime.metrics.requests.labels(task, kind, str(status)).inc()
        return Response(body, media_type="application/json")

    def task_info(entry: TaskEntry) -> TaskInfo:
        serving = entry.versions[entry.serving].manifest
        return TaskInfo(
            name=entry.name, kind=serving.kind, enabled=entry.enabled, serving_version=entry.serving,
            versions=sorted(entry.versions), labels=serving.labels, input_size=serving.input.size,
        )

    @app.get("/v1/tasks", response_model=list[TaskInfo], summary="Tasks this server can run", tags=["inference"], dependencies=api)
    async def list_tasks() -> list[TaskInfo]:
        catalog = registry().catalog  # kept fresh by the catalog refresh; no store read per call
        return [task_info(catalog[name]) for name in sorted(catalog)]

    @app.get(
        "/v1/tasks/{task}", response_model=TaskInfo, responses=ERROR_RESPONSES, summary="One task", tags=["inference"], dependencies=api
    )
    async def get_task(task: TaskName) -> TaskInfo:
        return task_info(await registry().entry(task))

    # ---- adapters --------------------------------------------------------------------------------

    def task_view(entry: TaskEntry) -> TaskView:
        reg = runtime.registry
        name = entry.name
        serving = entry.versions[entry.serving].manifest
        versions = []
        for version, info in sorted(entry.versions.items()):
            resident = reg.residents.get((name, version))
            versions.append(
                VersionView(
                    version=version,
                    bytes=info.nbytes,
                    created_at=info.manifest.created_at,
                    location=reg.location((name, version)),
                    slot=None if resident is None else resident.slot,
                    serving=version == entry.serving,
                )
            )
        return TaskView(
            name=name,
            kind=serving.kind,
            enabled=entry.enabled,
            serving_version=entry.serving,
            labels=len(serving.labels),
            input_size=serving.input.size,
            versions=versions,
        )

    admin = {"dependencies": [Depends(require_admin)], "responses": ERROR_RESPONSES, "tags": ["adapters"]}

    @app.get(ADMIN_PREFIX, response_model=AdapterList, summary="List tasks, versions and where they are loaded", **admin)
    async def list_adapters() -> AdapterList:
        reg = registry()
        await reg.refresh()
        engine = runtime.engine
        return AdapterList(
            tasks=[task_view(reg.catalog[name]) for name in sorted(reg.catalog)],
            device=DeviceView(
                device=str(engine.device),
                dtype=str(engine.dtype).removeprefix("torch."),
                slots=engine.num_slots,
                slots_used=len(reg.residents),
                slot_bytes=engine.slot_nbytes,
                resident_bytes=reg.resident_bytes(),
                budget_bytes=reg.gpu_budget_bytes,
            ),
            cpu_cache=CacheView(entries=len(reg.cpu_cache), bytes=reg.cpu_cache.nbytes, capacity_bytes=reg.cpu_cache.capacity),
        )

    @app.get(ADMIN_PREFIX + "/{task}", response_model=TaskView, summary="One task", **admin)
    async def get_adapter(task: TaskName) -> TaskView:
        return task_view(await registry().entry(task))

    @app.put(
        ADMIN_PREFIX + "/{task}",
        response_model=TaskView,
        status_code=201,
        openapi_extra=PACKAGE_BODY,
        summary="Upload a package (validated, stored, then hot-loaded)",
        **admin,
    )
    async def upload_adapter(task: TaskName, request: Request) -> TaskView:
        reg = registry()
        return task_view(await reg.upload(task, await request.body()))

    @app.post(ADMIN_PREFIX + "/{task}/load", response_model=TaskView, summary="Load a stored version", **admin)
    async def load_adapter(task: TaskName, request: Request, version: int | None = Query(default=None, ge=1)) -> TaskView:
        reg = registry()
        body = await request.body()
        if body.strip():
            try:
                version = LoadRequest.model_validate_json(body).version or version
            except ValidationError as exc:
                raise BadRequest(f"invalid JSON body: {exc.errors(include_url=False)[0]['msg']}") from None
        return task_view(await reg.load(task, version))

    @app.delete(ADMIN_PREFIX + "/{task}", response_model=UnloadResponse, summary="Unload (and optionally purge)", **admin)
    async def unload_adapter(task: TaskName, purge: bool = Query(default=False)) -> UnloadResponse:
        await registry().unload(task, purge=purge)
        return UnloadResponse(task=task, unloaded=True, purged=purge)

    app.include_router(oip_router(runtime, require_admin, require_api, registry))

    playground = (resources.files("monaserve.server") / "static" / "playground.html").read_bytes()
    playground_headers = page_headers(playground)

    @app.get("/", include_in_schema=False)
    async def playground_page() -> Response:
        """The playground: pick a task, drop an image, see the result drawn (plain HTML and JS, same origin)."""
        return Response(playground, media_type="text/html; charset=utf-8", headers=playground_headers)

    # ---- health and metrics --------------------------------------------------------------------

    @app.get("/health/live", response_model=Health, tags=["health"])
    async def live() -> Health:
        return Health(status="alive")

    @app.get("/health/ready", response_model=Health, responses={503: {"model": Health}}, tags=["health"])
    async def ready() -> Response:
        if runtime.ready:
            return JSONResponse(Health(status="ready").model_dump())
        return JSONResponse(Health(status=runtime.state, detail=runtime.error).model_dump(), status_code=503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
