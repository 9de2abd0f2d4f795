"""The kinds of task, each a `TaskKind` registered by name; importing this package registers them all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .base import KINDS, Budget, Metric, Options, OutputSpec, OutputTensor, ResultShapeError, TaskKind, get_kind, register_kind, to_host
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
    "ResultShapeError",
    "Segment",
    "SegmentHeadConfig",
    "SegmentResult",
    "Segmentation",
    "TaskKind",
    "build_head",
    "get_kind",
    "register_kind",
    "to_host",
]
