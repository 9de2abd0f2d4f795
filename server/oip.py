"""Open Inference Protocol v2 routes (KServe and Triton clients work unchanged).

A model is a task; a model version is an adapter version. A translator only: requests are read by
`oip_answer.py` into the data plane's terms and answered from its typed results.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from .dataplane import DataPlane, InferRequest
from .disconnect import unless_client_leaves
from .errors import BadRequest
from .model_stats import model_statistics
from .oip_answer import OipAnswer, parse_request
from .oip_codec import HEADER_LENGTH, parameters_of, short_repr, version_number
from .oip_models import model_metadata, server_metadata
from .oip_repository import LocalRepository
from .oip_schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ModelStatisticsResponse,
    RepositoryCall,
    RepositoryIndexRequest,
    RepositoryModel,
    ServerLive,
    ServerMetadata,
    ServerReady,
    body,
)
from .schemas import ERROR_STATUSES, OipError, TaskName, VersionNumber

OIP_ERRORS: dict[int | str, dict] = {status: {"model": OipError} for status in ERROR_STATUSES}
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            **body(InferenceRequest)["requestBody"]["content"],
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "description": "InferenceRequest's JSON, then binary tensor data"}
            },
        },
    },
    "responses": {
        "200": {
            "description": "outputs as JSON, or JSON then binary tensor data (Inference-Header-Content-Length)",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


def json_object(body: bytes) -> dict:
    """An optional JSON object body (empty: `{}`)."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


class OipEndpoints:
    """The /v2 routes over one data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.repository = LocalRepository(plane)  # in a front end, admin routes go to the engine process before they get here

    async def server_metadata(self) -> dict:
        return server_metadata()

    async def live(self) -> dict:
        return {"live": True}

    async def ready(self) -> Response:
        ready = self.plane.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    async def serving_metadata(self, name: TaskName) -> dict:
        return await self.metadata(name, None)

    async def serving_ready(self, name: TaskName) -> Response:
        return await self.model_ready(name, None)

    async def serving_infer(self, name: TaskName, request: Request) -> Response:
        return await self.infer(name, request, None)

    async def metadata(self, name: TaskName, version: VersionNumber | None) -> dict:
        return model_metadata(await self.plane.servable(name, version_number(version)))

    async def config(self, name: TaskName, version: VersionNumber | None) -> dict:
        return await self.plane.model_config(name, version_number(version))

    async def statistics(self, name: TaskName, version: VersionNumber | None) -> dict:
        return model_statistics(self.plane.metrics, await self.plane.stats_models(name, version_number(version)))

    async def all_statistics(self) -> dict:
        return model_statistics(self.plane.metrics, await self.plane.stats_models(None, None))

    async def serving_statistics(self, name: TaskName) -> dict:
        return await self.statistics(name, None)

    async def serving_config(self, name: TaskName) -> dict:
        return await self.config(name, None)

    async def model_ready(self, name: TaskName, version: VersionNumber | None) -> Response:
        ready = await self.plane.model_ready(name, version_number(version))
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)

    async def infer(self, name: TaskName, request: Request, version: VersionNumber | None) -> Response:
        body = await request.body()
        loop = asyncio.get_running_loop()
        header, images = await loop.run_in_executor(self.plane.runtime.decode_pool, parse_request, body, request.headers.get(HEADER_LENGTH))
        answer = OipAnswer(name, header)
        work = InferRequest(name, images, version_number(version))
        body, headers = await unless_client_leaves(request, self.plane.infer(work, answer, read_asked=answer.read))
        return Response(body, headers=headers)

    async def index(self, request: Request) -> list[dict]:
        only_ready = json_object(await request.body()).get("ready", False)
        if not isinstance(only_ready, bool):
            raise BadRequest(f"'ready' must be true or false; got {short_repr(only_ready)}")
        return await self.repository.index(only_ready)

    async def load(self, name: TaskName, request: Request) -> Response:
        await self.repository.load(name, parameters_of(json_object(await request.body()), "the load request"))
        return Response(status_code=200)

    async def unload(self, name: TaskName, request: Request) -> Response:
        await self.repository.unload(name, parameters_of(json_object(await request.body()), "the unload request"))
        return Response(status_code=200)


def oip_router(plane: DataPlane, require_api, require_admin) -> APIRouter:
    """The `/v2` routes: `require_api` guards the model routes, `require_admin` the repository."""
    endpoints = OipEndpoints(plane)
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
    add = router.add_api_route
    add("", endpoints.server_metadata, methods=["GET"], summary="Server metadata", response_model=ServerMetadata)
    add("/health/live", endpoints.live, methods=["GET"], summary="200 while the process runs", response_model=ServerLive)
    add(
        "/health/ready",
        endpoints.ready,
        methods=["GET"],
        summary="200 once the backbone is loaded and warmed, 400 otherwise",
        response_model=ServerReady,
        responses={400: {"model": ServerReady, "description": "not ready"}},
    )
    api = {"dependencies": [Depends(require_api)], "responses": OIP_ERRORS}
    ready = {
        "summary": "Model readiness: 200 ready, 400 not",
        "response_model": ModelReady,
        "dependencies": api["dependencies"],
        "responses": {**OIP_ERRORS, 400: {"model": ModelReady, "description": "not ready"}},
    }
    infer = {"summary": "Inference", "response_class": Response, "openapi_extra": INFER_DOC, **api}
    infer["responses"] = {**OIP_ERRORS, 200: {"model": InferenceResponse}}  # documents the component; INFER_DOC the content
    stats = {"response_model": ModelStatisticsResponse, **api}
    add("/models/stats", endpoints.all_statistics, methods=["GET"], summary="Statistics of every ready model version", **stats)
    for prefix, metadata, model_ready, model_infer, config, statistics in (  # the version it serves, or one in the path
        (
            "/models/{name}",
            endpoints.serving_metadata,
            endpoints.serving_ready,
            endpoints.serving_infer,
            endpoints.serving_config,
            endpoints.serving_statistics,
        ),
        (
            "/models/{name}/versions/{version}",
            endpoints.metadata,
            endpoints.model_ready,
            endpoints.infer,
            endpoints.config,
            endpoints.statistics,
        ),
    ):
        add(prefix, metadata, methods=["GET"], summary="Model metadata", response_model=ModelMetadata, **api)
        add(prefix + "/ready", model_ready, methods=["GET"], **ready)
        add(prefix + "/infer", model_infer, methods=["POST"], **infer)
        add(
            prefix + "/config",
            config,
            methods=["GET"],
            summary="Model configuration (Triton's extension)",
            response_model=ModelConfig,
            **api,
        )
        add(prefix + "/stats", statistics, methods=["GET"], summary="Model statistics (Triton's extension)", **stats)
    admin = {"dependencies": [Depends(require_admin)], "responses": OIP_ERRORS}
    optional_call = body(RepositoryCall, required=False)
    add(
        "/repository/index",
        endpoints.index,
        methods=["POST"],
        summary="Every stored version and its state",
        response_model=list[RepositoryModel],
        openapi_extra=body(RepositoryIndexRequest, required=False),
        **admin,
    )
    for action, endpoint, summary in (
        ("load", endpoints.load, "Load a model (its newest version)"),
        ("unload", endpoints.unload, "Unload a model (every version)"),
    ):
        add(
            f"/repository/models/{{name}}/{action}",
            endpoint,
            methods=["POST"],
            summary=summary,
            response_class=Response,
            openapi_extra=optional_call,
            **admin,
        )
    return router
