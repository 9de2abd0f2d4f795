"""Preparing images (and training targets) for a task's input spec as uint8, normalising batches of them
where the model runs, and the geometry to map results back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torchvision.transforms.v2.functional import InterpolationMode, resize

from .strict import Strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
"""Mask value for pixels that carry no label (letterbox padding)."""

Side = Annotated[int, Field(ge=32, le=2048, multiple_of=32)]


class InputSpec(Strict):
    """How images are prepared for the task."""

    size: tuple[Side, Side] = Field(description="(height, width) fed to the backbone")
    resize: Literal["resize", "letterbox"] = "resize"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = IMAGENET_STD


@dataclass(frozen=True)
class Prepared:
    """A prepared image (uint8 `(3, H, W)`) and how it maps back to the original: original = (model - offset) / scale."""

    tensor: torch.Tensor
    original_size: tuple[int, int]  # (height, width)
    scale: tuple[float, float]  # (y, x)
    offset: tuple[int, int]  # (top, left)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes in the model input's pixels -> the original image's, clipped to it (`prepare_boxes` inverted)."""
        height, width = self.original_size
        original = boxes.clone()
        original[:, 0::2] = ((boxes[:, 0::2] - self.offset[1]) / self.scale[1]).clamp(0, width)
        original[:, 1::2] = ((boxes[:, 1::2] - self.offset[0]) / self.scale[0]).clamp(0, height)
        return original

    def class_map_to_original(self, class_ids: torch.Tensor) -> np.ndarray:
        """A class map in the model input's pixels, cropped to the image (no letterbox padding) and resized,
        nearest, to the original size (`prepare_mask` inverted)."""
        height, width = self.original_size
        top, left = self.offset
        inner_h, inner_w = round(height * self.scale[0]), round(width * self.scale[1])
        crop = class_ids[top : top + inner_h, left : left + inner_w].to(torch.uint8).numpy()
        return np.asarray(Image.fromarray(crop, mode="L").resize((width, height), Image.Resampling.NEAREST))


def preprocess(image: Image.Image, spec: InputSpec, original_size: tuple[int, int] | None = None) -> Prepared:
    """Resize (or letterbox) to `spec.size` as uint8 `(3, H, W)`; `normalize` scales and normalises a
    batch of them later, where the model runs (4x less to copy than float32, one pass per batch).

    Letterbox padding is the mean colour, so it normalises to (about) 0. `original_size` (height, width)
    is the size of the original `image` stands for when it was decoded at reduced scale: the geometry in
    `Prepared` then maps back to that original.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return prepare_pixels(torch.from_numpy(np.array(rgb)).permute(2, 0, 1), spec, original_size)


def prepare_pixels(pixels: torch.Tensor, spec: InputSpec, original_size: tuple[int, int] | None = None) -> Prepared:
    """`preprocess` for decoded uint8 `(3, h, w)` pixels on any device (a CUDA JPEG decode's, say), in any layout.

    A resized result is channels-last in memory (a `(3, H, W)` view of `(H, W, 3)`), as torch's uint8
    resize makes it; `stack_images` batches any layout with one copy.
    """
    target_h, target_w = spec.size
    height, width = original_size or tuple(pixels.shape[1:])
    if spec.resize == "letterbox":
        ratio = min(target_w / width, target_h / height)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    else:
        new_w, new_h, top, left = target_w, target_h, 0, 0
    resized = resize_pixels(pixels, (new_h, new_w))
    if (new_h, new_w) == (target_h, target_w):
        tensor = resized
    else:
        fill = torch.tensor([round(255 * m) for m in spec.mean], dtype=torch.uint8, device=pixels.device)
        canvas = fill.repeat(target_h, target_w, 1)
        canvas[top : top + new_h, left : left + new_w] = resized.permute(1, 2, 0)
        tensor = canvas.permute(2, 0, 1)
    return Prepared(tensor, (height, width), (new_h / height, new_w / width), (top, left))


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 `(3, h, w)` resized to `size` (height, width) with antialiased bilinear filtering: Pillow's
    `BILINEAR` within rounding (at most 2 levels apart), in torch's uint8 kernel (3-5x faster on a CPU)."""
    if tuple(pixels.shape[1:]) == size:
        return pixels
    return resize(pixels[None], list(size), InterpolationMode.BILINEAR, antialias=True)[0]


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 `(3, H, W)` images as one `(B, 3, H, W)` batch, channels-last in memory: one copy, whatever their
    layout. Images on different devices (some decoded on the GPU, some on the CPU) meet on the GPU."""
    devices = {image.device for image in images}
    device = devices.pop() if len(devices) == 1 else next(d for d in devices if d.type != "cpu")
    return torch.stack([image.permute(1, 2, 0).to(device) for image in images]).permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` images scaled to [0, 1] and normalised, as `dtype`; `mean` and `std` broadcast
    against them (`(3, 1, 1)` for one task, `(B, 3, 1, 1)` for a sample each)."""
    return ((images.to(torch.float32) / 255.0 - mean) / std).to(dtype)


def spec_norm(spec: InputSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`spec`'s mean and std as `(3, 1, 1)` float32 tensors on `device`."""
    return (torch.tensor(spec.mean, device=device).view(3, 1, 1), torch.tensor(spec.std, device=device).view(3, 1, 1))


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
