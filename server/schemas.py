"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path
from pydantic import BaseModel, Field

from monaserve.adapters import TASK_NAME_PATTERN

Kind = Literal["classify", "detect", "segment"]
TaskName = Annotated[str, Path(pattern=TASK_NAME_PATTERN, description="task name: 1-64 of a-z, 0-9, '_', '-'")]
VersionNumber = Annotated[str, Path(pattern=r"^[1-9][0-9]{0,9}$", description="adapter version, a positive integer")]


class OipError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str
Location = Literal["gpu", "cpu", "store"]


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. unknown_task")
    message: str = Field(description="what was wrong, for people")


class ImagesRequest(BaseModel):
    """JSON alternative to multipart: base64-encoded image files."""

    images: list[str] = Field(min_length=1, description="base64 of each JPEG/PNG/WebP file")


class LabelScore(BaseModel):
    label: str
    index: int
    score: float


class ClassifyResult(BaseModel):
    top: list[LabelScore]


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float


class ClassifyResponse(BaseModel):
    task: str
    kind: Literal["classify"] = "classify"
    version: int = Field(description="the adapter version that produced every result of this response")
    results: list[ClassifyResult]
    timings_ms: Timings


class Detection(BaseModel):
    label: str
    index: int
    score: float
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in the original image's pixels")


class DetectResult(BaseModel):
    width: int
    height: int
    detections: list[Detection]


class DetectResponse(BaseModel):
    task: str
    kind: Literal["detect"] = "detect"
    version: int
    results: list[DetectResult]
    timings_ms: Timings


class ClassArea(BaseModel):
    label: str
    index: int
    pixels: int
    rle: list[int] | None = Field(
        default=None, description="COCO uncompressed RLE counts (column-major, starting with a 0-run); with ?rle=true"
    )


class SegmentResult(BaseModel):
    width: int
    height: int
    mask_png: str = Field(description="base64 PNG (8-bit grey) whose pixel values are class indices")
    classes: list[ClassArea]


class SegmentResponse(BaseModel):
    task: str
    kind: Literal["segment"] = "segment"
    version: int
    results: list[SegmentResult]
    timings_ms: Timings


class TaskInfo(BaseModel):
    """What callers of a task need to know; public, unlike the admin view."""

    name: str
    kind: Kind
    enabled: bool
    serving_version: int
    versions: list[int]
    labels: list[str]
    input_size: list[int] = Field(min_length=2, max_length=2, description="height, width")


class VersionView(BaseModel):
    version: int
    bytes: int
    created_at: datetime
    location: Location = Field(description="where it is loaded: gpu (in a slot), cpu (cached), or store only")
    slot: int | None = None
    serving: bool = Field(description="unpinned requests get this version")


class TaskView(BaseModel):
    name: str
    kind: Kind
    enabled: bool = Field(description="false after DELETE until the next load or upload")
    serving_version: int
    labels: int
    input_size: list[int] = Field(min_length=2, max_length=2, description="height, width")
    versions: list[VersionView]


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
    status: str
    detail: str | None = None
