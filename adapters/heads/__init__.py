"""Task heads, built from a manifest's head config.

Every head reads the backbone's NHWC pyramid (four stages, the last passed through the final norm) and has
`forward` (raw outputs), `loss(features, targets)` and `predict(features)` (one result per image).
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import Manifest
from .classify import ClassifyHead
from .detect import DetectHead
from .segment import SegmentHead

__all__ = ["ClassifyHead", "DetectHead", "SegmentHead", "build_head", "head_tensors", "load_head"]


def head_tensors(head: nn.Module) -> dict[str, torch.Tensor]:
    """What a package stores of a head: its state dict without integer bookkeeping (BatchNorm's counter)."""
    return {name: t for name, t in head.state_dict().items() if t.is_floating_point()}


def load_head(head: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `head_tensors` output back; anything else missing or extra is an error."""
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if name in head_tensors(head)]
    if missing or unexpected:
        raise ValueError(f"head tensors do not match: missing {missing}, unexpected {unexpected}")


def build_head(manifest: Manifest, stage_dims: list[int]) -> nn.Module:
    """The head a manifest describes, over backbone stages of widths `stage_dims`."""
    config, num_classes = manifest.head, len(manifest.labels)
    if manifest.kind == "classify":
        return ClassifyHead(stage_dims[-1], num_classes, dropout=config.dropout)
    if manifest.kind == "detect":
        return DetectHead(
            stage_dims,
            num_classes,
            fpn_channels=config.fpn_channels,
            score_threshold=config.score_threshold,
            nms_threshold=config.nms_threshold,
            max_detections=config.max_detections,
        )
    return SegmentHead(stage_dims, num_classes, channels=config.channels, pool_scales=config.pool_scales)
