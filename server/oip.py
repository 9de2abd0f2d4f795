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
from .oip_answer import OipAnswer, parse_request
from .oip_codec import HEADER_LENGTH, parameters_of, short_repr
from .oip_schemas import ModelReady, ServerLive, ServerReady
from .schemas import ERROR_STATUSES, OipError, TaskName, VersionNumber

PLATFORM = "monaserve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_repository(unload_dependents)", "parameters"]
INPUTS = [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
"""The input a model declares. `pixels` (UINT8 `[N, H, W, 3]` or `[H, W, 3]`) is accepted in its place
but not declared: tools fill every declared input, and a request holds exactly one."""
ALTERNATIVE_INPUT = "pixels: UINT8 [-1, -1, -1, 3] or [-1, -1, 3], in place of image"
LOAD_PARAMETERS: dict[str, str] = {
    "config": "a model's configuration comes from its adapter package: upload a new version (PUT /v1/adapters/{name}/versions/{v})",
    "file:": "adapter files are uploaded as packages (PUT /v1/adapters/{name}/versions/{v}), never with a load",
}
"""Triton's load parameters, refused with the reason; `unload_dependents` is accepted (a task has no dependents)."""
OIP_ERRORS: dict[int | str, dict] = {status: {"model": OipError} for status in ERROR_STATUSES}
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "array"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "outputs as JSON, or JSON then binary tensor data (Inference-Header-Content-Length)",
            "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
        }
    },
}


def version_number(version: str | None) -> int | None:
    if version is None:
        return None
    if not version.isdigit() or int(version) < 1:
        raise BadRequest(f"model versions are positive integers, got {version!r}")
    return int(version)


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


def check_repository_parameters(name: str, parameters: dict, action: str) -> None:
    """A load or unload's parameters: `unload_dependents` (a flag) on unloads, nothing else; 400 naming why."""
    for key, value in parameters.items():
        refused = LOAD_PARAMETERS.get(key.split(":", 1)[0] + ":" if ":" in key else key)  # file:<path> is one family
        if refused is not None:
            raise BadRequest(f"{action} parameter {short_repr(key)} is not supported: {refused.format(name=name, v='N')}")
        if action == "unload" and key == "unload_dependents":
            if not isinstance(value, bool):
                raise BadRequest(f"parameter 'unload_dependents' must be true or false; got {short_repr(value)}")
            continue
        raise BadRequest(f"unknown {action} parameter {short_repr(key)}")


class OipEndpoints:
    """The /v2 routes over one data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def server_metadata(self) -> dict:
        return {"name": "monaserve", "version": "0.1.0", "extensions": EXTENSIONS}

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
        target = await self.plane.servable(name, version_number(version))
        return {
            "name": name,
            "versions": [str(v) for v in sorted(target.entry.versions)],
            "platform": PLATFORM,
            "inputs": INPUTS,
            "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in target.kind.outputs],
            "parameters": {"kind": target.kind.name, "labels": len(target.manifest.labels), "alternative_input": ALTERNATIVE_INPUT},
        }

    async def model_ready(self, name: TaskName, version: VersionNumber | None) -> Response:
        target = await self.plane.task(name, version_number(version))
        ready = self.plane.ready and target.entry.enabled  # what the index says: every stored version of a loaded task
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
        registry = self.plane.registry
        await registry.refresh()
        only_ready = json_object(await request.body()).get("ready", False)
        if not isinstance(only_ready, bool):
            raise BadRequest(f"'ready' must be true or false; got {short_repr(only_ready)}")
        return [
            {"name": entry.name, "version": str(version), "state": "READY" if entry.enabled else "UNAVAILABLE", "reason": reason}
            for entry in self.plane.tasks()
            if entry.enabled or not only_ready
            for reason in ["" if entry.enabled else "unloaded"]
            for version in sorted(entry.versions)
        ]

    async def load(self, name: TaskName, request: Request) -> Response:
        check_repository_parameters(name, parameters_of(json_object(await request.body()), "the load request"), "load")
        await self.plane.registry.load(name)
        return Response(status_code=200)

    async def unload(self, name: TaskName, request: Request) -> Response:
        check_repository_parameters(name, parameters_of(json_object(await request.body()), "the unload request"), "unload")
        await self.plane.registry.unload(name)
        return Response(status_code=200)


def oip_router(plane: DataPlane, require_api, require_admin) -> APIRouter:
    """The `/v2` routes: `require_api` guards the model routes, `require_admin` the repository."""
    endpoints = OipEndpoints(plane)
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
    add = router.add_api_route
    add("", endpoints.server_metadata, methods=["GET"], summary="Server metadata")
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
    for prefix, metadata, model_ready, model_infer in (  # the version the model serves, or one named in the path
        ("/models/{name}", endpoints.serving_metadata, endpoints.serving_ready, endpoints.serving_infer),
        ("/models/{name}/versions/{version}", endpoints.metadata, endpoints.model_ready, endpoints.infer),
    ):
        add(prefix, metadata, methods=["GET"], summary="Model metadata", **api)
        add(prefix + "/ready", model_ready, methods=["GET"], **ready)
        add(prefix + "/infer", model_infer, methods=["POST"], **infer)
    admin = {"dependencies": [Depends(require_admin)], "responses": OIP_ERRORS}
    add("/repository/index", endpoints.index, methods=["POST"], summary="Models in the repository and their state", **admin)
    add(
        "/repository/models/{name}/load",
        endpoints.load,
        methods=["POST"],
        summary="Load a model (its newest version)",
        response_class=Response,
        **admin,
    )
    add("/repository/models/{name}/unload", endpoints.unload, methods=["POST"], summary="Unload a model", response_class=Response, **admin)
    return router
