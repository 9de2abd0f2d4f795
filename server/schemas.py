"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Union

from fastapi import Path
from pydantic import BaseModel, Field, create_model

from monaserve.adapters import KINDS, TASK_NAME_PATTERN, TaskKind

Kind = Literal[tuple(KINDS)]
TASK_NAME_HELP = "task name: 1-64 of a-z, 0-9, '_', '-'"
TaskName = Annotated[str, Path(pattern=TASK_NAME_PATTERN, description=TASK_NAME_HELP)]
VersionNumber = Annotated[str, Path(pattern=r"^[1-9][0-9]{0,9}$", description="adapter version, a positive integer")]


class OipError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


Location = Literal["slot", "cache", "store"]


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. unknown_task")
    message: str = Field(description="what was wrong, for people")


class ImagesRequest(BaseModel):
    """JSON alternative to multipart: base64-encoded image files."""

    images: list[str] = Field(min_length=1, description="base64 of each JPEG/PNG/WebP file")


class Timings(BaseModel):
    decode_ms: float = Field(description="reading and decoding the images, and preparing them for the model")
    queue_ms: float = Field(description="waiting for a batch")
    inference_ms: float = Field(description="the batch: backbone, adapters and heads")
    total_ms: float = Field(
        description="from when the server took the request to its answer built: post-processing and encoding "
        "(a mask's PNG) included, all but writing the JSON text"
    )


def response_model(kind: TaskKind) -> type[BaseModel]:
    """The /v1 answer of a `kind` request: its task, the version that made every result, one result per image."""
    return create_model(
        f"{kind.name.capitalize()}Response",
        task=(str, ...),
        kind=(Literal[kind.name], kind.name),
        version=(int, Field(description="the adapter version that produced every result of this response")),
        results=(list[kind.result_schema], ...),
        timings_ms=(Timings, ...),
    )


RESPONSES = {name: response_model(kind) for name, kind in KINDS.items()}
InferResponse = Union[tuple(RESPONSES.values())]  # noqa: UP007 (built from the registered kinds)
ERROR_STATUSES = (400, 401, 403, 404, 408, 409, 413, 415, 422, 503, 504, 507)


class TaskInfo(BaseModel):
    """What callers of a task need to know; public, unlike the admin view."""

    name: str
    kind: Kind
    enabled: bool
    serving_version: int
    versions: list[int]
    labels: list[str]
    input_size: list[int] = Field(min_length=2, max_length=2, description="height, width")
    defaults: dict[str, int | float | bool] = Field(
        description="the request options of this task's kind, as a request that leaves them out gets them (e.g. detect's min_score)"
    )


class VersionView(BaseModel):
    version: int
    bytes: int
    created_at: datetime
    location: Location = Field(
        description="where it is loaded: slot (in an adapter slot on the engine's device, `device`), cache (host memory), or store only"
    )
    slot: int | None = None
    device: str | None = Field(default=None, description="the device of its slot (cpu, cuda, cuda:1, ...), while in one")
    serving: bool = Field(description="unpinned requests get this version")


class TaskView(BaseModel):
    name: str
    kind: Kind
    enabled: bool = Field(description="false after DELETE until the next load or upload")
    serving_version: int
    labels: int
    input_size: list[int] = Field(min_length=2, max_length=2, description="height, width")
    versions: list[VersionView]


class UploadResponse(TaskView):
    """The task after an upload, and the version the upload was stored as."""

    version: int = Field(description="the version this upload was stored as: the task's next unless the request asked for one")


class DeviceView(BaseModel):
    device: str
    dtype: str
    slots: int
    slots_used: int
    slot_bytes: int = Field(description="device bytes of one slot of folded Mona adapters")
    resident_bytes: int = Field(description="bytes of adapters (slots in use plus heads) on the device")
    budget_bytes: int | None = Field(description="--gpu-adapter-mb as bytes; null: slots are the only limit")


class CacheView(BaseModel):
    entries: int
    bytes: int
    capacity_bytes: int


class AdapterList(BaseModel):
    tasks: list[TaskView]
    device: DeviceView
    cpu_cache: CacheView


class LoadRequest(BaseModel):
    version: int | None = Field(default=None, ge=1, description="default: the newest stored version")


class UnloadResponse(BaseModel):
    task: str
    unloaded: bool
    purged: bool


class Health(BaseModel):
    status: str = Field(description="alive; or loading, ready, draining, failed")
    detail: str | None = Field(default=None, description="why the server failed")
    activity: str | None = Field(default=None, description="while loading: what it does, e.g. 'training demo', 'loading backbone'")
    step: str | None = Field(default=None, description="while loading: how far the activity is, e.g. '2/3' demo tasks")
    eta_s: float | None = Field(default=None, description="while loading: the seconds the activity should take still")
