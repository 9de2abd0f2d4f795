"""What every task head shares: the levels of the pyramid it reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..swin import NORMED_LAST


def stage_inputs(levels: list[torch.Tensor], stages: Sequence[int], stage_norm: bool) -> list[torch.Tensor]:
    """The NHWC maps of `stages` a head reads from `forward_pyramid`'s levels.

    With `stage_norm`, each through a LayerNorm of its own at weight 1 and bias 0 (the official dense setups'
    per-stage norms, which ImageNet checkpoints lack and Mona tuning keeps frozen); without, as the stages
    leave them, the last through the backbone's final norm (as packages trained before them read them).
    """
    if stage_norm:
        return [F.layer_norm(levels[i], levels[i].shape[-1:]) for i in stages]
    return [levels[NORMED_LAST] if i == NORMED_LAST - 1 else levels[i] for i in stages]


def to_nchw(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """NHWC maps as NCHW, for convolutional heads."""
    return [f.permute(0, 3, 1, 2).contiguous() for f in features]
