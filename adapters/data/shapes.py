"""A synthetic shapes dataset in all three task formats, from the same images, with exact boxes and masks.

Each image holds 1-3 shapes (circle, square, triangle) in random colours on a textured background. It is
written as an ImageFolder (classify: the class of the largest visible shape), a COCO detection json with
boxes computed from the visible pixels, and PNG masks of class ids (0 is background).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 90, 230), (240, 220, 40), (200, 60, 220), (40, 210, 220), (250, 140, 20))


@dataclass(frozen=True)
class ShapeInstance:
    class_id: int  # 1-based, 0 is background
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive) of the visible pixels
    area: int


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes of a random frequency and angle over a random base colour, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, frequency = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
    stripes = np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)))[..., None]
    base, accent = rng.uniform(40, 200, size=3), rng.uniform(-50, 50, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    return np.clip(base + accent * stripes + noise, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, class_id: int, centre: tuple[float, float], radius: float, fill) -> None:
    cx, cy = centre
    if CLASSES[class_id - 1] == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif CLASSES[class_id - 1] == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)


def render(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray, list[ShapeInstance]]:
    """One image, its class-id mask, and its visible instances."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    instance_map = Image.new("L", (size, size), 0)
    instance_draw = ImageDraw.Draw(instance_map)
    classes = []
    for index in range(1, int(rng.integers(1, 4)) + 1):
        class_id = int(rng.integers(1, len(CLASSES) + 1))
        radius = float(rng.uniform(0.1, 0.25) * size)
        centre = tuple(rng.uniform(radius, size - radius, size=2))
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        _draw(draw, class_id, centre, radius, colour)
        _draw(instance_draw, class_id, centre, radius, index)  # later shapes cover earlier ones
        classes.append(class_id)
    instances_ids = np.asarray(instance_map)
    mask = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for index, class_id in enumerate(classes, start=1):
        visible = instances_ids == index
        if not visible.any():
            continue
        mask[visible] = class_id
        ys, xs = np.nonzero(visible)
        instances.append(ShapeInstance(class_id, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), int(visible.sum())))
    return image, mask, instances


def write_shapes(out: str | Path, num_images: int = 300, size: int = 160, seed: int = 0) -> Path:
    """Write the dataset under `out` as `classify/`, `detect/` and `segment/`; returns `out`."""
    out = Path(out)
    for part in ("classify", "detect", "segment"):
        shutil.rmtree(out / part, ignore_errors=True)
    for name in CLASSES:
        (out / "classify" / name).mkdir(parents=True)
    for folder in ("detect/images", "segment/images", "segment/masks"):
        (out / folder).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name} for i, name in enumerate(CLASSES, start=1)],
    }
    for image_id in range(1, num_images + 1):
        image, mask, instances = render(rng, size)
        file_name = f"{image_id:06d}.png"
        largest = max(instances, key=lambda inst: inst.area)
        for path in (
            out / "classify" / CLASSES[largest.class_id - 1] / file_name,
            out / "detect" / "images" / file_name,
            out / "segment" / "images" / file_name,
        ):
            image.save(path)
        Image.fromarray(mask, mode="L").save(out / "segment" / "masks" / file_name)
        coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for inst in instances:
            x1, y1, x2, y2 = inst.box
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": inst.class_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": inst.area,
                    "iscrowd": 0,
                }
            )
    (out / "detect" / "annotations.json").write_text(json.dumps(coco))
    (out / "segment" / "classes.json").write_text(json.dumps(["background", *CLASSES]))
    return out
