"""The /v1 inference API: images in as multipart, JSON base64 or a raw body; each kind's JSON results out.

A translator only: it reads the request into an `InferRequest` and renders the data plane's typed
results with the kind's `to_json`; everything else happens in `dataplane.py`.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import Field, ValidationError

from monaserve.adapters import TASK_NAME_PATTERN
from monaserve.adapters.kinds import MAX_DETECTIONS_RANGE, MIN_SCORE_RANGE, TOP_K_RANGE, Options, get_kind

from .catalog import TaskEntry
from .dataplane import DataPlane, InferRequest, InferResult, check_image_count
from .disconnect import unless_client_leaves
from .errors import BadRequest, UnsupportedMedia
from .params import RouteParams
from .schemas import ERROR_STATUSES, RESPONSES, TASK_NAME_HELP, ErrorBody, ImagesRequest, InferResponse, Kind, TaskInfo, TaskName, Timings

ERROR_RESPONSES = {status: {"model": ErrorBody} for status in ERROR_STATUSES}
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


async def read_images(request: Request, max_images: int) -> list[bytes]:
    """Image files from a multipart form (`image` fields), JSON base64 (`images`), or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
        files = [f for f in form.getlist("image") if not isinstance(f, str)]
        if not files:
            raise BadRequest("multipart body has no file in an 'image' field")
        check_image_count(len(files), max_images)
        return [await f.read() for f in files]
    if content_type == "application/json":
        try:
            body = ImagesRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise BadRequest(
                f'invalid JSON body: {exc.errors(include_url=False)[0]["msg"]} (expected {{"images": [base64, ...]}})'
            ) from None
        check_image_count(len(body.images), max_images)
        images = []
        for i, encoded in enumerate(body.images):
            try:
                images.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}] is not valid base64") from None
        return images
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [await request.body()]
    raise UnsupportedMedia(f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data, application/json or an image")


class InferParams(RouteParams):
    """The path and query parameters of a /v1 inference request."""

    path_fields = ("task", "kind")
    task: str = Field(pattern=TASK_NAME_PATTERN, description=TASK_NAME_HELP)
    kind: Kind = Field(description="the task's kind")
    version: int | None = Field(default=None, ge=1, description="pin an adapter version")
    top_k: int = Field(default=Options.top_k, ge=TOP_K_RANGE[0], le=TOP_K_RANGE[1], description="classify: labels per image")
    min_score: float | None = Field(
        default=Options.min_score,
        ge=MIN_SCORE_RANGE[0],
        le=MIN_SCORE_RANGE[1],
        description="detect: drop boxes scoring less (default: the task's, in its `defaults`)",
    )
    max_detections: int | None = Field(
        default=Options.max_detections,
        ge=MAX_DETECTIONS_RANGE[0],
        le=MAX_DETECTIONS_RANGE[1],
        description="detect: the most boxes per image, best first (default and most: the task's, in its `defaults`)",
    )
    class_agnostic: bool | None = Field(
        default=Options.class_agnostic,
        description="detect: one box per object, whatever its label (class-agnostic NMS; default: the task's, in its `defaults`)",
    )
    rle: bool = Field(default=Options.rle, description="segment: add per-class RLE")

    def options(self) -> Options:
        """What the request asks of its results."""
        return Options(
            top_k=self.top_k,
            min_score=self.min_score,
            max_detections=self.max_detections,
            class_agnostic=self.class_agnostic,
            rle=self.rle,
        )


def render(result: InferResult) -> bytes:
    """The JSON answer of a /v1 inference request, no larger than its budget allows."""
    kind, budget = result.kind, result.budget
    results = [kind.to_json(r, result.options, budget) for r in result.results]  # masks are encoded as PNG here
    timings = {**result.timings_s, "total": result.total_s()}  # the answer is built: all but writing its JSON text
    response = RESPONSES[kind.name](
        task=result.task,
        version=result.version,
        results=results,
        timings_ms=Timings(**{f"{k}_ms": round(v * 1000, 3) for k, v in timings.items()}),
    )
    body = response.model_dump_json().encode()
    budget.check_total(len(body))
    return body


def task_info(entry: TaskEntry) -> TaskInfo:
    serving = entry.manifest
    return TaskInfo(
        name=entry.name,
        kind=serving.kind,
        enabled=entry.enabled,
        serving_version=entry.serving,
        versions=sorted(entry.versions),
        labels=serving.labels,
        input_size=serving.input.size,
        defaults=get_kind(serving.kind).described_defaults(serving.head),
    )


class InferenceEndpoints:
    """The /v1 inference and task routes over one data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def infer(self, request: Request) -> Response:
        params = InferParams.read(request)
        images = await read_images(request, self.plane.config.max_images_per_request)
        work = InferRequest(params.task, images, params.version, params.kind, params.options())
        body = await unless_client_leaves(request, self.plane.infer(work, render))
        return Response(body, media_type="application/json")

    async def list_tasks(self) -> list[TaskInfo]:
        return [task_info(entry) for entry in self.plane.tasks()]

    async def get_task(self, task: TaskName) -> TaskInfo:
        return task_info((await self.plane.task(task)).entry)


def inference_router(plane: DataPlane, require_api) -> APIRouter:
    """The /v1 inference routes, each guarded by `require_api`."""
    endpoints = InferenceEndpoints(plane)
    router = APIRouter(prefix="/v1/tasks", tags=["inference"], dependencies=[Depends(require_api)])
    router.add_api_route(
        "/{task}/{kind}",
        endpoints.infer,
        methods=["POST"],
        response_model=InferResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={**IMAGE_BODY, "parameters": InferParams.openapi_parameters()},
        summary="Run images through a task",
    )
    router.add_api_route("", endpoints.list_tasks, methods=["GET"], response_model=list[TaskInfo], summary="Tasks this server can run")
    router.add_api_route(
        "/{task}", endpoints.get_task, methods=["GET"], response_model=TaskInfo, responses=ERROR_RESPONSES, summary="One task"
    )
    return router
