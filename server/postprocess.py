"""Turning head outputs into response results, in the original image's pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from monaserve.adapters import Manifest
from monaserve.adapters.transforms import Prepared

from .budgets import ResponseBudget
from .schemas import ClassArea, ClassifyResult, Detection, DetectResult, LabelScore, SegmentResult


def classify(logits: torch.Tensor, manifest: Manifest, top_k: int) -> ClassifyResult:
    """Softmax over the task's labels, best `top_k` first."""
    probabilities = logits.float().softmax(dim=-1)
    scores, indices = probabilities.topk(min(top_k, probabilities.numel()))
    return ClassifyResult(
        top=[
            LabelScore(label=manifest.labels[i], index=i, score=s)
            for s, i in zip(scores.tolist(), indices.tolist())
        ]
    )


def detect(output: dict[str, torch.Tensor], manifest: Manifest, prepared: Prepared, min_score: float) -> DetectResult:
    """Boxes mapped from the model's input back to the original image (xyxy pixels), best first."""
    height, width = prepared.original_size
    keep = output["scores"] >= min_score
    boxes = output["boxes"][keep].clone()
    boxes[:, 0::2] = ((boxes[:, 0::2] - prepared.offset[1]) / prepared.scale[1]).clamp(0, width)
    boxes[:, 1::2] = ((boxes[:, 1::2] - prepared.offset[0]) / prepared.scale[0]).clamp(0, height)
    detections = [
        Detection(label=manifest.labels[label], index=label, score=score, box=[round(v, 2) for v in box])
        for box, score, label in zip(boxes.tolist(), output["scores"][keep].tolist(), output["labels"][keep].tolist())
    ]
    return DetectResult(width=width, height=height, detections=detections)


def original_class_map(class_ids: torch.Tensor, prepared: Prepared) -> np.ndarray:
    """The model-input class map cropped to the image (no letterbox padding) and resized, nearest, to
    the original size."""
    height, width = prepared.original_size
    top, left = prepared.offset
    inner_h = round(height * prepared.scale[0])
    inner_w = round(width * prepared.scale[1])
    crop = class_ids[top : top + inner_h, left : left + inner_w].to(torch.uint8).numpy()
    return np.asarray(Image.fromarray(crop, mode="L").resize((width, height), Image.Resampling.NEAREST))


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


def segment(class_ids: torch.Tensor, manifest: Manifest, prepared: Prepared, rle: bool, budget: ResponseBudget) -> SegmentResult:
    """A PNG of class ids at the original size, per-class pixel areas, and per-class RLE on request,
    each charged to `budget` before it is turned into JSON."""
    mask = original_class_map(class_ids, prepared)
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    mask_png = base64.b64encode(buffer.getvalue()).decode()
    budget.charge(len(mask_png), f"a {mask.shape[1]}x{mask.shape[0]} mask")
    ids, counts = np.unique(mask, return_counts=True)
    classes = []
    for i, n in zip(ids, counts):
        runs = None
        if rle:
            runs = rle_encode(mask == i)
            budget.charge(json_length(runs), f"the RLE of class {int(i)} ({len(runs)} runs)")
        classes.append(ClassArea(label=manifest.labels[i], index=int(i), pixels=int(n), rle=None if runs is None else runs.tolist()))
    return SegmentResult(width=mask.shape[1], height=mask.shape[0], mask_png=mask_png, classes=classes)
