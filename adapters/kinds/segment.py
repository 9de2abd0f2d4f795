"""Semantic segmentation: a class per pixel, from a UperNet head; data: images + PNG masks, or ADE20K; mean IoU."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import nn

from ..data.datasets import Sample
from ..heads.segment import SegmentHead
from ..metrics import ConfusionIoU
from ..strict import Strict
from ..transforms import InputSpec, Prepared, prepare_mask
from .base import Budget, Options, OutputSpec, Recipe, ResultShapeError, TaskKind, Tensors, register_kind


class SegmentHeadConfig(Strict):
    """UperNet over `labels` (every class id a mask may hold, background included)."""

    type: Literal["upernet"] = "upernet"
    channels: int = Field(default=256, ge=8, le=1024)
    pool_scales: tuple[Annotated[int, Field(ge=1, le=16)], ...] = Field(default=(1, 2, 3, 6), min_length=1, max_length=8)
    stage_norm: bool = Field(
        default=False,
        description="each backbone stage the head reads goes through its own LayerNorm at weight 1 and bias 0, as in the official "
        "setup; `monaserve train` turns it on, packages trained before it have it off and read the stages raw",
    )


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


@dataclass(frozen=True)
class Segmentation:
    """One image's class map in the model input's pixels and the way back; `mask` (original size) is made
    on first use, so an answer too large for its budget is refused before any mask exists."""

    labels: list[str]
    class_ids: torch.Tensor
    prepared: Prepared

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return self.prepared.original_size

    @cached_property
    def mask(self) -> np.ndarray:
        """`(height, width)` uint8 class ids at the original size."""
        return self.prepared.class_map_to_original(self.class_ids)


def rle_encode(binary: np.ndarray) -> np.ndarray:
    """COCO-style uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = binary.ravel(order="F").astype(np.uint8)
    boundaries = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], boundaries, [flat.size]]))
    return np.concatenate([[0], runs]) if flat.size and flat[0] else runs


def json_length(counts: np.ndarray) -> int:
    """Characters of `counts` (non-negative integers) written as a JSON list."""
    digits = np.floor(np.log10(np.maximum(counts, 1))).astype(np.int64) + 1
    return int(digits.sum()) + max(len(counts) - 1, 0) + 2


@register_kind
class Segment(TaskKind[Segmentation]):
    name = "segment"
    head_config = SegmentHeadConfig
    result_schema = SegmentResult
    outputs = (OutputSpec("mask", "UINT8", (-1, -1, -1)),)
    options = ("rle",)
    recipe = Recipe(drop_path=0.2, weight_decay=0.01, decay_biases=True)  # ade20k_upernet_swin_large_160k_mona.py
    max_labels = 255  # class ids travel as 8-bit PNG

    def default_head(self, channels: int) -> SegmentHeadConfig:
        return SegmentHeadConfig(channels=channels, stage_norm=True)

    def build_head(self, config: SegmentHeadConfig, stage_dims: list[int], num_classes: int) -> nn.Module:
        return SegmentHead(stage_dims, num_classes, channels=config.channels, pool_scales=config.pool_scales, stage_norm=config.stage_norm)

    def target(self, sample: Sample, prepared: Prepared, flip: bool, spec: InputSpec) -> torch.Tensor:
        mask = sample.target.open()
        if flip:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return prepare_mask(mask, prepared, spec)

    def metric(self, num_classes: int) -> ConfusionIoU:
        return ConfusionIoU(num_classes)

    def postprocess(self, class_ids: torch.Tensor, labels: list[str], prepared: Prepared, options: Options) -> Segmentation:
        return Segmentation(labels, class_ids, prepared)

    def to_json(self, result: Segmentation, options: Options, budget: Budget) -> SegmentResult:
        """A PNG of class ids at the original size, per-class pixel areas, and per-class RLE if asked,
        each charged to `budget` before it is turned into JSON."""
        mask = result.mask
        buffer = io.BytesIO()
        Image.fromarray(mask, mode="L").save(buffer, format="PNG")
        mask_png = base64.b64encode(buffer.getvalue()).decode()
        budget.charge(len(mask_png), f"a {mask.shape[1]}x{mask.shape[0]} mask")
        ids, counts = np.unique(mask, return_counts=True)
        classes = []
        for i, n in zip(ids, counts):
            runs = None
            if options.rle:
                runs = rle_encode(mask == i)
                budget.charge(json_length(runs), f"the RLE of class {int(i)} ({len(runs)} runs)")
            classes.append(ClassArea(label=result.labels[i], index=int(i), pixels=int(n), rle=None if runs is None else runs.tolist()))
        return SegmentResult(width=mask.shape[1], height=mask.shape[0], mask_png=mask_png, classes=classes)

    def tensors(self, results: list[Segmentation]) -> Tensors:
        """`mask` `[N, H, W]` of class ids: one tensor, so the images must share one size."""
        sizes = {r.size for r in results}
        if len(sizes) > 1:
            raise ResultShapeError("a segment request's images must share one size: the 'mask' output is one [N, H, W] tensor")
        return {"mask": ([len(results), *sizes.pop()], lambda: np.stack([r.mask for r in results]))}
