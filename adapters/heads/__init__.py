"""Task heads (each kind builds its own: `kinds.build_head`).

Every head reads the levels of the backbone's NHWC pyramid it needs (`swin.forward_pyramid`: the four
stages as they leave them, then the last through the final norm; `base.stage_inputs` picks them) and has
`forward` (raw outputs), `loss(features, targets)` and `predict(features)`: one result per image, all at
the same stage, the answer in the model input's pixels (class probabilities, boxes after NMS, class ids).
"""

from __future__ import annotations

import torch
from torch import nn

from .classify import ClassifyHead
from .detect import DetectHead
from .segment import SegmentHead

__all__ = ["ClassifyHead", "DetectHead", "SegmentHead", "head_tensors", "load_head"]


def head_tensors(head: nn.Module) -> dict[str, torch.Tensor]:
    """What a package stores of a head: its state dict without integer bookkeeping (BatchNorm's counter)."""
    return {name: t for name, t in head.state_dict().items() if t.is_floating_point()}


def load_head(head: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `head_tensors` output back; anything else missing or extra is an error."""
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if name in head_tensors(head)]
    if missing or unexpected:
        raise ValueError(f"head tensors do not match: missing {missing}, unexpected {unexpected}")
