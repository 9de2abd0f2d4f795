"""The adapter manifest: what a task package declares about itself, validated by pydantic."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from .mona import INNER_DIM

FORMAT = "monaserve.adapter/1"
TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LABELS = 100_000

TaskName = Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Side = Annotated[int, Field(ge=32, le=2048, multiple_of=32)]


def validate_task_name(name: str) -> str:
    """Return `name` if it is a valid task name, else raise ValueError saying what is allowed."""
    if not isinstance(name, str) or not re.fullmatch(TASK_NAME_PATTERN, name):
        raise ValueError(
            f"invalid task name {name!r}: use 1-64 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneRef(_Strict):
    """The exact backbone an adapter was trained on."""

    name: str = Field(min_length=1, max_length=128)
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


class InputSpec(_Strict):
    """How images are prepared for the task."""

    size: tuple[Side, Side] = Field(description="(height, width) fed to the backbone")
    resize: Literal["resize", "letterbox"] = "resize"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[
        Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]
    ] = IMAGENET_STD


class ClassifyHeadConfig(_Strict):
    """Pooled features -> LayerNorm -> Linear over `labels`."""

    type: Literal["linear"] = "linear"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class DetectHeadConfig(_Strict):
    """FPN + RetinaNet over `labels` (object classes, no background)."""

    type: Literal["retinanet"] = "retinanet"
    fpn_channels: int = Field(default=256, ge=8, le=1024)
    score_threshold: float = Field(default=0.05, ge=0.0, le=1.0)
    nms_threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=1000)


class SegmentHeadConfig(_Strict):
    """UperNet over `labels` (every class id a mask may hold, background included)."""

    type: Literal["upernet"] = "upernet"
    channels: int = Field(default=256, ge=8, le=1024)
    pool_scales: tuple[Annotated[int, Field(ge=1, le=16)], ...] = Field(default=(1, 2, 3, 6), min_length=1, max_length=8)


HeadConfig = Annotated[ClassifyHeadConfig | DetectHeadConfig | SegmentHeadConfig, Field(discriminator="type")]
HEAD_TYPES = {"classify": "linear", "detect": "retinanet", "segment": "upernet"}


class Manifest(_Strict):
    """Header metadata of one adapter package (one task, one version)."""

    format: Literal["monaserve.adapter/1"] = FORMAT
    name: TaskName
    version: int = Field(ge=1, le=2**31 - 1)
    kind: Literal["classify", "detect", "segment"]
    labels: list[Label] = Field(min_length=1, max_length=MAX_LABELS)
    backbone: BackboneRef
    mona_inner_dim: int = Field(default=INNER_DIM, ge=1, le=1024)
    input: InputSpec
    head: HeadConfig = Field(description="defaults to the kind's head")
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    training: dict[str, Any] = Field(default_factory=dict, description="training summary and evaluation")

    @model_validator(mode="before")
    @classmethod
    def _default_head(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("head") is None and data.get("kind") in HEAD_TYPES:
            data = {**data, "head": {"type": HEAD_TYPES[data["kind"]]}}
        return data

    @model_validator(mode="after")
    def _head_fits_kind(self) -> Manifest:
        if self.head.type != HEAD_TYPES[self.kind]:
            raise ValueError(f"a {self.kind} task needs a {HEAD_TYPES[self.kind]!r} head, not {self.head.type!r}")
        if self.kind == "segment" and len(self.labels) > 255:
            raise ValueError("a segment task has at most 255 classes (class ids are stored as 8-bit PNG)")
        return self

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        seen: set[str] = set()
        duplicates = sorted({label for label in labels if label in seen or seen.add(label)})
        if duplicates:
            raise ValueError(f"labels must be unique; repeated: {duplicates[:5]}")
        return labels
