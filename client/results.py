"""Typed results of the inference routes, with numpy views of boxes and masks; each carries its request's
`timings_ms` (decode, queue, inference, total), as the server measured them."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Classification:
    """Top labels of one image, best first."""

    labels: list[LabelScore]
    task: str = ""
    version: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

    def top(self, k: int = 1) -> list[LabelScore]:
        return self.labels[:k]

    @property
    def best(self) -> LabelScore:
        return self.labels[0]


@dataclass(frozen=True)
class Detection:
    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original image's pixels


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image, best first."""

    width: int
    height: int
    detections: list[Detection]
    task: str = ""
    version: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def boxes(self) -> np.ndarray:
        """`(N, 4)` float32 x1, y1, x2, y2."""
        return np.array([d.box for d in self.detections], dtype=np.float32).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        return np.array([d.score for d in self.detections], dtype=np.float32)

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.detections]


@dataclass(frozen=True)
class ClassArea:
    label: str
    index: int
    pixels: int


@dataclass(frozen=True)
class Segmentation:
    """Per-pixel classes of one image; `mask` decodes the server's PNG into class indices."""

    width: int
    height: int
    mask_png: bytes = field(repr=False)
    classes: list[ClassArea]
    task: str = ""
    version: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

    @cached_property
    def mask(self) -> np.ndarray:
        """`(height, width)` uint8 class indices."""
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.mask_png)))


Result = Classification | Detections | Segmentation


def _classifications(body: dict, common: dict) -> list[Classification]:
    return [Classification([LabelScore(**t) for t in r["top"]], **common) for r in body["results"]]


def _detections(body: dict, common: dict) -> list[Detections]:
    return [
        Detections(r["width"], r["height"], [Detection(**{**d, "box": tuple(d["box"])}) for d in r["detections"]], **common)
        for r in body["results"]
    ]


def _segmentations(body: dict, common: dict) -> list[Segmentation]:
    return [
        Segmentation(
            r["width"],
            r["height"],
            base64.b64decode(r["mask_png"]),
            [ClassArea(c["label"], c["index"], c["pixels"]) for c in r["classes"]],
            **common,
        )
        for r in body["results"]
    ]


PARSERS = {"classify": _classifications, "detect": _detections, "segment": _segmentations}
"""How each kind's /v1 results read, by kind."""


def parse_results(body: dict) -> list[Result]:
    """The results of one inference response, one per image."""
    parser = PARSERS.get(body["kind"])
    if parser is None:
        raise ValueError(f"unknown result kind {body['kind']!r}")
    return parser(body, {"task": body["task"], "version": body["version"], "timings_ms": body.get("timings_ms", {})})
