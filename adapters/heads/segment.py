"""Segmentation head: UperNet (pyramid pooling on the last stage + FPN fusion), as the paper used on ADE20K."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from ..transforms import IGNORE_INDEX
from .base import stage_inputs, to_nchw


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=nn.BatchNorm2d)


class SegmentHead(nn.Module):
    """Per-pixel class logits at stride 4 from the four Swin stages.

    Pyramid pooling (scales `pool_scales`) on stage 4, lateral 1x1 + top-down FPN on stages 1-3, all
    levels upsampled to stride 4, concatenated, fused by a 3x3 conv, then a 1x1 classifier. With
    `stage_norm`, every stage first goes through its own frozen affine-free LayerNorm, as the official setup.
    """

    def __init__(
        self,
        stage_dims: list[int],
        num_classes: int,
        channels: int = 256,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        stage_norm: bool = False,
    ) -> None:
        super().__init__()
        self.stage_norm = stage_norm
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv(stage_dims[-1], channels, 1)) for scale in pool_scales)
        self.bottleneck = _conv(stage_dims[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv(dim, channels, 1) for dim in stage_dims[:-1])
        self.fpn_convs = nn.ModuleList(_conv(channels, channels, 3) for _ in stage_dims[:-1])
        self.fuse = _conv(len(stage_dims) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = to_nchw(stage_inputs(features, range(len(self.laterals) + 1), self.stage_norm))
        top = maps[-1]
        pooled = [F.interpolate(pool(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for pool in self.pools]
        levels = [lateral(m) for lateral, m in zip(self.laterals, maps[:-1])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs], 1))
        return self.classifier(self.dropout(fused))

    def loss(self, features: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class-id masks `(B, H, W)` in input pixels; `IGNORE_INDEX` is ignored."""
        logits = F.interpolate(self(features), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class ids `(H, W)` at the input size, one map per image."""
        size = (features[0].shape[1] * 4, features[0].shape[2] * 4)
        logits = F.interpolate(self(features), size=size, mode="bilinear", align_corners=False)
        return list(logits.argmax(1).to(torch.int32))
