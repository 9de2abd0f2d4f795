"""Turning head outputs into response results, in the original image's pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from monaserve.adapters import Manifest
from monaserve.adapters.transforms import Prepared

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


def rle_encode(binary: np.ndarray) -> list[int]:
    """COCO-style uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = binary.ravel(order="F").astype(np.uint8)
    boundaries = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def segment(class_ids: torch.Tensor, manifest: Manifest, prepared: Prepared, rle: bool) -> SegmentResult:
    """A PNG of class ids at the original size, per-class pixel areas, and per-class RLE on request."""
    mask = original_class_map(class_ids, prepared)
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    ids, counts = np.unique(mask, return_counts=True)
    classes = [
        ClassArea(
            label=manifest.labels[i],
            index=int(i),
            pixels=int(n),
            rle=rle_encode(mask == i) if rle else None,
        )
        for i, n in zip(ids, counts)
    ]
    return SegmentResult(
        width=mask.shape[1], height=mask.shape[0], mask_png=base64.b64encode(buffer.getvalue()).decode(), classes=classes
    )
