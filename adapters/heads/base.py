"""What every task head shares: the pyramid it reads."""

from __future__ import annotations

import torch


def to_nchw(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The backbone's NHWC stage outputs as NCHW maps, for convolutional heads."""
    return [f.permute(0, 3, 1, 2).contiguous() for f in features]
