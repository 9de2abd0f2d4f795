"""Training data: samples and their targets, and readers for the formats users already have (ImageFolder, COCO
detection json, images + PNG masks); `formats.py` picks a reader, and reads the public benchmarks' layouts."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..transforms import IGNORE_INDEX, InputSpec, preprocess, stack_images

if TYPE_CHECKING:
    from ..kinds import TaskKind

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


REDUCE_ZERO_LABEL = bytes([IGNORE_INDEX, *range(254), IGNORE_INDEX])
"""The mask lookup of mmseg's `reduce_zero_label`: 0 (unlabelled) is ignored, k is class k-1, 255 stays ignored."""


@dataclass(frozen=True)
class MaskFile:
    """A PNG of class ids, with the table its values go through where they are not the labels' indices as stored."""

    path: Path
    lookup: bytes | None = None
    """256 entries: class id (or `IGNORE_INDEX`) of each stored value; None keeps the values as they are."""

    def open(self) -> Image.Image:
        """The mask as class ids: the PNG, each value mapped through `lookup`."""
        mask = Image.open(self.path)
        if self.lookup is None:
            return mask
        return Image.fromarray(np.frombuffer(self.lookup, dtype=np.uint8)[np.asarray(mask)], mode="L")


@dataclass(frozen=True)
class Sample:
    """One image and its label: a class index, `{boxes (xyxy), labels}`, or a mask file."""

    path: Path
    target: int | dict[str, torch.Tensor] | MaskFile


@dataclass
class TaskData:
    """The samples of one dataset and its class names (in label order); `held_out`, where the dataset ships an
    evaluation split, is validated on instead of a random share of `samples`; `notes` say what its reader left out."""

    labels: list[str]
    samples: list[Sample] = field(default_factory=list)
    held_out: list[Sample] | None = None
    notes: list[str] = field(default_factory=list)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
        """(train, validation): every sample and the held-out ones where the dataset has them, else a
        deterministic shuffle with the last `val_fraction` (at least one sample) for validation."""
        if self.held_out is not None:
            return list(self.samples), list(self.held_out)
        order = list(range(len(self.samples)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 else 0
        train = [self.samples[i] for i in order[: len(order) - n_val]]
        val = [self.samples[i] for i in order[len(order) - n_val :]]
        return train, val


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root: str | Path) -> TaskData:
    """`root/<class>/<image>`: classes are the sorted folder names."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image>)")
    data = TaskData(classes)
    for index, name in enumerate(classes):
        data.samples += [Sample(path, index) for path in _images_in(root / name)]
    return data


def coco_detection(annotations: str | Path, images: str | Path | None = None) -> TaskData:
    """A COCO json; images are `file_name`s under `images` (default: `images/` beside the json).

    Category ids map to labels 0..K-1 in id order; crowd boxes are left out.
    """
    annotations = Path(annotations)
    images = Path(images) if images else annotations.parent / "images"
    coco = json.loads(annotations.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    boxes: dict[int, list[tuple[list[float], int]]] = {image["id"]: [] for image in coco["images"]}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append(([x, y, x + w, y + h], label_of[a["category_id"]]))
    data = TaskData([c["name"] for c in categories])
    for image in coco["images"]:
        entries = boxes[image["id"]]
        target = detection_target([b for b, _ in entries], [label for _, label in entries], image["id"])
        data.samples.append(Sample(images / image["file_name"], target))
    return data


def detection_target(boxes: list[list[float]], labels: list[int], image_id: int) -> dict[str, torch.Tensor]:
    """One image's detection target: xyxy pixel boxes `(N, 4)` float32, their labels int64, and the image's id."""
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": torch.tensor(image_id),
    }


def image_masks(images: str | Path, masks: str | Path, labels: Sequence[str] | None = None) -> TaskData:
    """`images/<stem>.*` with `masks/<stem>.png` of class ids; class names from `labels`, else from a
    `classes.json` beside the folders."""
    images, masks = Path(images), Path(masks)
    if labels is None:
        names_file = images.parent / "classes.json"
        if not names_file.exists():
            raise ValueError(f"class names needed: pass labels or write {names_file} (a JSON list, id order)")
        labels = json.loads(names_file.read_text())
    return TaskData(list(labels), mask_samples(images, masks))


def mask_samples(images: Path, masks: Path, lookup: bytes | None = None) -> list[Sample]:
    """Each image in `images` with its mask `masks/<stem>.png`, read through `lookup` (see `MaskFile`)."""
    samples = []
    for path in _images_in(images):
        mask = masks / f"{path.stem}.png"
        if not mask.exists():
            raise ValueError(f"no mask for {path.name}: expected {mask}")
        samples.append(Sample(path, MaskFile(mask, lookup)))
    return samples


class TaskDataset(Dataset):
    """Images prepared like the server prepares them, with targets mapped the same way (by their kind).

    With `augment`, images (and their targets) are flipped left-right at random.
    """

    def __init__(self, kind: TaskKind, samples: list[Sample], spec: InputSpec, augment: bool = False) -> None:
        self.kind, self.samples, self.spec, self.augment = kind, samples, spec, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = Image.open(sample.path).convert("RGB")
        flip = self.augment and random.random() < 0.5
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        prepared = preprocess(image, self.spec)
        return prepared.tensor, self.kind.target(sample, prepared, flip, self.spec)


def collate(batch: list[tuple[torch.Tensor, object]]):
    """Stack images; stack class indices and masks; keep detection targets as a list."""
    images = stack_images([image for image, _ in batch])
    targets = [target for _, target in batch]
    if isinstance(targets[0], int):
        return images, torch.tensor(targets)
    if isinstance(targets[0], torch.Tensor):
        return images, torch.stack(targets)
    return images, targets
