"""Preparing images for a task: torch's uint8 resize is Pillow's bilinear within rounding, and batches
stack from any layout and device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.adapters.transforms import prepare_pixels, preprocess, resize_pixels, stack_images


def photo(height: int, width: int) -> np.ndarray:
    """Smooth gradients with sharp stripes: edges where resize filters differ, flats where they agree."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), ((x // 7 + y // 5) % 2) * 255], -1).astype(np.uint8)


@pytest.mark.parametrize("size", [(32, 32), (256, 256), (375, 500), (500, 375), (224, 224), (1000, 90)])
def test_the_resize_is_pillows_bilinear_within_rounding(size):
    pixels = photo(*size)
    ours = resize_pixels(torch.from_numpy(pixels).permute(2, 0, 1), (224, 224)).permute(1, 2, 0).numpy().astype(int)
    pillow = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.Resampling.BILINEAR)).astype(int)
    difference = np.abs(ours - pillow)
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_letterboxing_a_tensor_matches_letterboxing_the_image():
    spec = InputSpec(size=(224, 224), resize="letterbox")
    pixels = photo(300, 500)
    from_image = preprocess(Image.fromarray(pixels), spec)
    from_tensor = prepare_pixels(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), spec)
    assert (from_image.scale, from_image.offset, from_image.original_size) == (from_tensor.scale, from_tensor.offset, (300, 500))
    assert torch.equal(from_image.tensor, from_tensor.tensor)


def test_stacking_gives_one_channels_last_batch_whatever_the_layout():
    images = [torch.from_numpy(photo(64, 64)).permute(2, 0, 1), torch.from_numpy(photo(64, 64)).permute(2, 0, 1).contiguous()]
    batch = stack_images(images)
    assert batch.shape == (2, 3, 64, 64) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([image.contiguous() for image in images]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="images on two devices need a GPU")
def test_images_on_the_cpu_and_the_gpu_stack_on_the_gpu():
    cpu, gpu = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.ones(3, 8, 8, dtype=torch.uint8, device="cuda")
    batch = stack_images([cpu, gpu])
    assert batch.device.type == "cuda" and batch[:, 0, 0, 0].tolist() == [0, 1]
