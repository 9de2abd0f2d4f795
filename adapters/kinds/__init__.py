"""The kinds of task, each a `TaskKind` registered by name; importing this package registers them all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .base import (
    KINDS,
    MAX_DETECTIONS_RANGE,
    MIN_SCORE_RANGE,
    TOP_K_RANGE,
    Budget,
    Metric,
    Options,
    OutputSpec,
    OutputTensor,
    Recipe,
    ResultShapeError,
    TaskKind,
    Tensors,
    get_kind,
    register_kind,
    to_host,
)
from .classify import Classify, ClassifyHeadConfig, ClassifyResult, LabelScore
from .detect import Detect, DetectHeadConfig, Detection, DetectResult
from .segment import ClassArea, Segment, Segmentation, SegmentHeadConfig, SegmentResult

if TYPE_CHECKING:
    from ..manifest import Manifest


def build_head(manifest: Manifest, stage_dims: list[int]) -> nn.Module:
    """The head a manifest describes, over backbone stages of widths `stage_dims`."""
    return get_kind(manifest.kind).build_head(manifest.head, stage_dims, len(manifest.labels))


__all__ = [
    "KINDS",
    "MAX_DETECTIONS_RANGE",
    "MIN_SCORE_RANGE",
    "TOP_K_RANGE",
    "Budget",
    "ClassArea",
    "Classify",
    "ClassifyHeadConfig",
    "ClassifyResult",
    "Detect",
    "DetectHeadConfig",
    "DetectResult",
    "Detection",
    "LabelScore",
    "Metric",
    "Options",
    "OutputSpec",
    "OutputTensor",
    "Recipe",
    "ResultShapeError",
    "Segment",
    "SegmentHeadConfig",
    "SegmentResult",
    "Segmentation",
    "TaskKind",
    "Tensors",
    "build_head",
    "get_kind",
    "register_kind",
    "to_host",
]
