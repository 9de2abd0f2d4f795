"""Open Inference Protocol v2 routes (KServe and Triton clients work unchanged).

A model is a task; a model version is an adapter version. Inputs: `image` (BYTES, encoded files) or
`pixels` (UINT8, `[N, H, W, 3]` or `[H, W, 3]`). Outputs by kind: classify `scores`, `labels`,
`indices` `[N, K]`; detect `boxes` `[N, M, 4]`, `scores`, `labels`, `indices` `[N, M]` (padded) and
`num_detections` `[N]`; segment `mask` `[N, H, W]` (class indices). Request parameters `top_k` and
`min_score` tune classify and detect; `binary_data_output` (or an output's `binary_data`) returns
tensors with the binary extension.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from . import postprocess
from .budgets import ResponseBudget
from .disconnect import unless_client_leaves
from .errors import BadRequest, ResponseTooLarge, TaskUnloaded, UnknownVersion, status_of
from .oip_codec import (
    HEADER_LENGTH,
    encode_response,
    encoded_size,
    is_integer,
    output_tensor,
    parameters_of,
    read_inputs,
    short_repr,
    split_body,
)
from .registry import Registry, TaskEntry
from .runtime import Inference, Runtime
from .schemas import OipError, TaskName, VersionNumber

PLATFORM = "monaserve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
INPUTS = [{"name": "image", "datatype": "BYTES", "shape": [-1]}, {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
OUTPUTS = {
    "classify": [("scores", "FP32", [-1, -1]), ("labels", "BYTES", [-1, -1]), ("indices", "INT64", [-1, -1])],
    "detect": [
        ("boxes", "FP32", [-1, -1, 4]), ("scores", "FP32", [-1, -1]), ("labels", "BYTES", [-1, -1]),
        ("indices", "INT64", [-1, -1]), ("num_detections", "INT32", [-1]),
    ],
    "segment": [("mask", "UINT8", [-1, -1, -1])],
}
Tensor = tuple[str, Any, list[int]]  # datatype, values, shape
OIP_ERRORS: dict[int | str, dict] = {
    status: {"model": OipError} for status in (400, 401, 403, 404, 408, 409, 413, 415, 422, 503, 504, 507)
}
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
MAX_INLINE_MASK_PIXELS = 4_000_000
"""Most mask pixels as JSON numbers (building them is slow); larger masks must use the binary extension."""


def oip_router(runtime: Runtime, require_admin: Callable, require_api: Callable, registry: Callable[[], Registry]) -> APIRouter:
    """The `/v2` routes over `runtime`; `require_api` guards the model routes, `require_admin` the repository."""
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

    @router.get("", summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": "monaserve", "version": "0.1.0", "extensions": EXTENSIONS}

    @router.get("/health/live", summary="200 while the process runs", response_class=Response)
    async def live() -> Response:
        return Response(status_code=200)

    @router.get(
        "/health/ready", summary="200 once the backbone is loaded and warmed, 400 otherwise", response_class=Response,
        responses={400: {"description": "not ready"}},
    )
    async def ready() -> Response:
        return Response(status_code=200 if runtime.ready else 400)

    async def entry_and_version(name: str, version: str | None) -> tuple[TaskEntry, int]:
        number = _version_number(version)
        entry = await registry().entry(name, number)
        number = entry.serving if number is None else number
        if number not in entry.versions:
            raise UnknownVersion(f"model {name!r} has no version {number}; versions: {sorted(entry.versions)}")
        return entry, number

    async def metadata(name: str, version: str | None = None) -> dict:
        entry, number = await entry_and_version(name, version)
        kind = entry.versions[number].manifest.kind
        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": PLATFORM,
            "inputs": INPUTS,
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in OUTPUTS[kind]],
            "parameters": {"kind": kind, "labels": len(entry.versions[number].manifest.labels)},
        }

    async def model_ready(name: str, version: str | None = None) -> Response:
        entry, _ = await entry_and_version(name, version)
        return Response(status_code=200 if runtime.ready and entry.enabled else 400)

    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        loop = asyncio.get_running_loop()
        config = runtime.config
        status = 500
        try:
            body = await request.body()
            header, images = await loop.run_in_executor(
                runtime.decode_pool, _parse_request, body, request.headers.get(HEADER_LENGTH), config.max_images_per_request
            )
            entry, number = await entry_and_version(name, version)
            if not entry.enabled:
                raise TaskUnloaded(f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load to serve it again")
            kind = entry.versions[number].manifest.kind
            options = _options(kind, header)
            pinned = number if version is not None else None
            result = await unless_client_leaves(request, runtime.infer(name, kind, images, pinned))
            budget = ResponseBudget(int(config.max_response_mb * 2**20))

            def respond() -> tuple[bytes, dict[str, str]]:
                return _response(name, header, result, _outputs(result, options, budget), options, budget)

            body, headers = await loop.run_in_executor(runtime.decode_pool, respond)
            status = 200
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            if runtime.registry is not None and name in runtime.registry.catalog:
                runtime.metrics.requests.labels(name, "oip", str(status)).inc()
        return Response(body, headers=headers)

    api = {"dependencies": [Depends(require_api)], "responses": OIP_ERRORS}
    metadata_doc = {"summary": "Model metadata", **api}
    ready_doc = {
        "summary": "Model readiness: 200 ready, 400 not (empty bodies)", "response_class": Response,
        "dependencies": api["dependencies"], "responses": {**OIP_ERRORS, 400: {"description": "not ready"}},
    }
    infer_doc = {"summary": "Inference", "response_class": Response, "openapi_extra": INFER_DOC, **api}

    @router.get("/models/{name}", **metadata_doc)
    async def model_metadata(name: TaskName) -> dict:
        return await metadata(name)

    @router.get("/models/{name}/versions/{version}", **metadata_doc)
    async def model_version_metadata(name: TaskName, version: VersionNumber) -> dict:
        return await metadata(name, version)

    @router.get("/models/{name}/ready", **ready_doc)
    async def ready_model(name: TaskName) -> Response:
        return await model_ready(name)

    @router.get("/models/{name}/versions/{version}/ready", **ready_doc)
    async def ready_model_version(name: TaskName, version: VersionNumber) -> Response:
        return await model_ready(name, version)

    @router.post("/models/{name}/infer", **infer_doc)
    async def infer_model(name: TaskName, request: Request) -> Response:
        return await infer(name, request)

    @router.post("/models/{name}/versions/{version}/infer", **infer_doc)
    async def infer_model_version(name: TaskName, version: VersionNumber, request: Request) -> Response:
        return await infer(name, request, version)

    admin = {"dependencies": [Depends(require_admin)], "responses": OIP_ERRORS}

    @router.post("/repository/index", summary="Models in the repository and their state", **admin)
    async def index(request: Request) -> list[dict]:
        reg = registry()
        await reg.refresh()
        body = await request.body()
        only_ready = bool(body.strip()) and bool(_json_object(body).get("ready"))
        models = []
        for name in sorted(reg.catalog):
            entry = reg.catalog[name]
            for version in sorted(entry.versions):
                serving = entry.enabled and version == entry.serving
                state = "READY" if serving else "UNAVAILABLE"
                if not only_ready or serving:
                    reason = "" if serving else ("unloaded" if not entry.enabled else "not the serving version")
                    models.append({"name": name, "version": str(version), "state": state, "reason": reason})
        return models

    @router.post("/repository/models/{name}/load", summary="Load a model (its newest version)", response_class=Response, **admin)
    async def load(name: TaskName) -> Response:
        await registry().load(name)
        return Response(status_code=200)

    @router.post("/repository/models/{name}/unload", summary="Unload a model", response_class=Response, **admin)
    async def unload(name: TaskName) -> Response:
        await registry().unload(name)
        return Response(status_code=200)

    return router


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


def _version_number(version: str | None) -> int | None:
    if version is None:
        return None
    if not version.isdigit() or int(version) < 1:
        raise BadRequest(f"model versions are positive integers, got {version!r}")
    return int(version)


@dataclass(frozen=True)
class Options:
    """What a request asks of its response, checked before any inference runs."""

    top_k: int
    min_score: float
    outputs: list[tuple[str, bool]]  # name, as binary


def _parse_request(body: bytes, header_length: str | None, max_images: int) -> tuple[dict, list[bytes | np.ndarray]]:
    """The JSON header and the images (runs in the decode pool: large bodies must not stall the loop)."""
    header, binary = split_body(body, header_length)
    return header, _images(read_inputs(header, binary), max_images)


def _options(kind: str, header: dict) -> Options:
    parameters = parameters_of(header, "the request")
    top_k = _parameter(parameters, "top_k", int, 5, 1, 1000)
    min_score = _parameter(parameters, "min_score", float, 0.0, 0.0, 1.0)
    binary_default = _flag(parameters, "binary_data_output", False, "the request")
    names = [n for n, _, _ in OUTPUTS[kind]]
    requested = header.get("outputs") or [{"name": n} for n in names]
    if not isinstance(requested, list):
        raise BadRequest("'outputs' must be a list")
    outputs, seen = [], set()
    for spec in requested:
        output = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(output, str) or output not in names:
            raise BadRequest(f"unknown output {short_repr(output)}; {kind} models give {names}")
        if output in seen:
            raise BadRequest(f"output {output!r} is requested twice; ask for each output once")
        seen.add(output)
        outputs.append((output, _flag(parameters_of(spec, f"output {output!r}"), "binary_data", binary_default, f"output {output!r}")))
    if "id" in header and not isinstance(header["id"], str):
        raise BadRequest(f"'id' must be a string, got {type(header['id']).__name__}")
    return Options(top_k, min_score, outputs)


def _images(inputs: dict, max_images: int) -> list[bytes | np.ndarray]:
    """The request's images from its one input: `image` (BYTES) or `pixels` (UINT8 HWC)."""
    if len(inputs) != 1 or not inputs.keys() <= {"image", "pixels"}:
        raise BadRequest(f"send exactly one input, 'image' (BYTES) or 'pixels' (UINT8); got {sorted(inputs)}")
    (name, (datatype, shape, values)), = inputs.items()
    if name == "image":
        if datatype != "BYTES" or len(shape) != 1:
            raise BadRequest(f"input 'image' must be BYTES of shape [N]; got {datatype} {shape}")
        images = list(values)
    else:
        if datatype != "UINT8" or len(shape) not in (3, 4) or shape[-1] != 3:
            raise BadRequest(f"input 'pixels' must be UINT8 of shape [N, H, W, 3] or [H, W, 3]; got {datatype} {shape}")
        images = list(values) if len(shape) == 4 else [values]
    if not images:
        raise BadRequest("the request holds no image")
    if len(images) > max_images:
        raise BadRequest(f"{len(images)} images in one request; the limit is {max_images}")
    return images


def _outputs(result: Inference, options: Options, budget: ResponseBudget) -> dict[str, Tensor]:
    """Every output tensor of `result`'s kind, batch first (masks only if `budget` has room for them; they
    are charged as they are encoded)."""
    manifest, pairs = result.manifest, list(zip(result.outputs, result.prepared))
    n = len(pairs)
    if manifest.kind == "classify":
        tops = [postprocess.classify(output, manifest, options.top_k).top for output, _ in pairs]
        k = len(tops[0])
        return {
            "scores": ("FP32", [[t.score for t in top] for top in tops], [n, k]),
            "labels": ("BYTES", [t.label for top in tops for t in top], [n, k]),
            "indices": ("INT64", [[t.index for t in top] for top in tops], [n, k]),
        }
    if manifest.kind == "detect":
        found = [postprocess.detect(output, manifest, prepared, options.min_score).detections for output, prepared in pairs]
        m = max(len(d) for d in found)
        boxes, scores, indices = np.zeros((n, m, 4), np.float32), np.zeros((n, m), np.float32), np.zeros((n, m), np.int64)
        labels = [[""] * m for _ in range(n)]
        for i, detections in enumerate(found):
            for j, d in enumerate(detections):
                boxes[i, j], scores[i, j], indices[i, j], labels[i][j] = d.box, d.score, d.index, d.label
        return {
            "boxes": ("FP32", boxes, [n, m, 4]), "scores": ("FP32", scores, [n, m]),
            "labels": ("BYTES", [label for row in labels for label in row], [n, m]),
            "indices": ("INT64", indices, [n, m]), "num_detections": ("INT32", [len(d) for d in found], [n]),
        }
    sizes = {prepared.original_size for prepared in result.prepared}
    if len(sizes) > 1:
        raise BadRequest("a segment request's images must share one size: the 'mask' output is one [N, H, W] tensor")
    shape = [n, *next(iter(sizes))]
    inline = any(not binary for name, binary in options.outputs if name == "mask")
    if inline and math.prod(shape) > MAX_INLINE_MASK_PIXELS:
        raise ResponseTooLarge(
            f"the 'mask' output would hold {math.prod(shape)} pixels; the limit as JSON numbers is "
            f"{MAX_INLINE_MASK_PIXELS}: ask for it with binary_data (the binary tensor extension)"
        )
    budget.check(encoded_size("UINT8", None, shape, binary=not inline), "output 'mask'")  # before the masks are made
    masks = [postprocess.original_class_map(output, prepared) for output, prepared in pairs]
    return {"mask": ("UINT8", np.stack(masks), shape)}


def _parameter(parameters: dict, name: str, kind: type, default: Any, low: float, high: float) -> Any:
    value = parameters.get(name, default)
    if is_integer(value):
        valid = low <= value <= high  # exact for integers of any length (no float conversion)
    elif isinstance(value, float):
        valid = math.isfinite(value) and (kind is float or value.is_integer()) and low <= value <= high
    else:
        valid = False
    if not valid:
        wanted = "an integer" if kind is int else "a number"
        raise BadRequest(f"parameter {name!r} must be {wanted} in {low:g}..{high:g}; got {short_repr(value)}")
    return kind(value)


def _flag(parameters: dict, name: str, default: bool, what: str) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter {name!r} must be true or false; got {short_repr(value)}")
    return value


def _response(name: str, header: dict, result: Inference, tensors: dict[str, Tensor], options: Options, budget: ResponseBudget) -> tuple[bytes, dict[str, str]]:
    """The requested outputs (all by default), inline or binary as asked, each charged to `budget` before it is encoded."""
    entries, chunks = [], []
    for output, binary in options.outputs:
        datatype, values, shape = tensors[output]
        budget.charge(encoded_size(datatype, values, shape, binary), f"output {output!r}")
        entry, chunk = output_tensor(output, datatype, values, shape, binary)
        entries.append(entry)
        chunks.append(chunk)
    response = {"model_name": name, "model_version": str(result.version), "outputs": entries}
    if "id" in header:
        response["id"] = header["id"]
    body, headers = encode_response(response, b"".join(chunks))
    if len(body) > budget.limit:
        raise ResponseTooLarge(f"the answer would be {len(body)} bytes; the limit is {budget.limit} (--max-response-mb)")
    return body, headers
