"""Draw a result on its image: boxes with labels, or the class mask blended in colour (PIL only)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .results import Classification, Detections, Result, Segmentation


def palette(index: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_result(image: Image.Image, result: Result, alpha: float = 0.45) -> Image.Image:
    """A copy of `image` (EXIF orientation applied, as the server sees it) with `result` drawn on it."""
    canvas = ImageOps.exif_transpose(image).convert("RGB")
    if isinstance(result, Segmentation):
        mask = result.mask
        colours = np.array([palette(i) for i in range(256)], dtype=np.uint8)[mask]
        overlay = Image.fromarray(colours).resize(canvas.size, Image.Resampling.NEAREST)
        blended = Image.blend(canvas, overlay, alpha)
        keep = Image.fromarray(((mask == 0) * 255).astype(np.uint8)).resize(canvas.size, Image.Resampling.NEAREST)
        canvas = Image.composite(canvas, blended, keep)  # class 0 (background) stays as it was
        return canvas
    draw = ImageDraw.Draw(canvas)
    if isinstance(result, Detections):
        for detection in result.detections:
            colour = palette(detection.index + 1)
            draw.rectangle(detection.box, outline=colour, width=max(1, round(min(canvas.size) / 150)))
            draw.text((detection.box[0] + 2, detection.box[1] + 1), f"{detection.label} {detection.score:.2f}", fill=colour)
    elif isinstance(result, Classification):
        for row, label in enumerate(result.top(3)):
            draw.text((4, 4 + 12 * row), f"{label.label} {label.score:.2f}", fill=palette(label.index + 1))
    return canvas
