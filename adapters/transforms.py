"""Preparing images (and training targets) for a task's input spec, and the geometry to map results back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .manifest import InputSpec

IGNORE_INDEX = 255
"""Mask value for pixels that carry no label (letterbox padding)."""


@dataclass(frozen=True)
class Prepared:
    """A preprocessed image and how it maps back to the original: original = (model - offset) / scale."""

    tensor: torch.Tensor
    original_size: tuple[int, int]  # (height, width)
    scale: tuple[float, float]  # (y, x)
    offset: tuple[int, int]  # (top, left)


def preprocess(image: Image.Image, spec: InputSpec, original_size: tuple[int, int] | None = None) -> Prepared:
    """Resize (or letterbox) to `spec.size`, scale to [0, 1] and normalise with `spec.mean`/`spec.std`.

    `original_size` (height, width) is the size of the original `image` stands for when it was decoded
    at reduced scale: the geometry in `Prepared` then maps back to that original.
    """
    target_h, target_w = spec.size
    height, width = original_size or (image.height, image.width)
    if spec.resize == "letterbox":
        ratio = min(target_w / width, target_h / height)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    else:
        new_w, new_h, top, left = target_w, target_h, 0, 0
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    tensor = torch.zeros(3, target_h, target_w)  # letterbox padding is the mean colour (0 after normalising)
    tensor[:, top : top + new_h, left : left + new_w] = (torch.from_numpy(resized).permute(2, 0, 1) - mean) / std
    return Prepared(tensor, (height, width), (new_h / height, new_w / width), (top, left))


def prepare_boxes(boxes: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """xyxy boxes in original pixels -> the model input's pixels."""
    scale = torch.tensor([prepared.scale[1], prepared.scale[0]] * 2)
    offset = torch.tensor([prepared.offset[1], prepared.offset[0]] * 2)
    return boxes * scale + offset


def prepare_mask(mask: Image.Image, prepared: Prepared, spec: InputSpec) -> torch.Tensor:
    """A class-id mask resized (nearest) like its image; letterbox padding is `IGNORE_INDEX`."""
    target_h, target_w = spec.size
    height, width = prepared.original_size
    new_h, new_w = round(height * prepared.scale[0]), round(width * prepared.scale[1])
    top, left = prepared.offset
    resized = torch.from_numpy(np.asarray(mask.resize((new_w, new_h), Image.Resampling.NEAREST), dtype=np.int64).copy())
    out = torch.full((target_h, target_w), IGNORE_INDEX, dtype=torch.int64)
    out[top : top + new_h, left : left + new_w] = resized
    return out
