"""The synthetic shapes dataset: one set of images in three formats, with exact boxes and masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monaserve.adapters.data.shapes import CLASSES, write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), num_images=40, size=96, seed=3)


def test_three_formats_hold_the_same_images(shapes):
    detect_images = sorted(p.name for p in (shapes / "detect" / "images").iterdir())
    assert len(detect_images) == 40
    assert detect_images == sorted(p.name for p in (shapes / "segment" / "images").iterdir())
    assert detect_images == sorted(p.name for p in (shapes / "segment" / "masks").iterdir())
    assert detect_images == sorted(p.name for c in CLASSES for p in (shapes / "classify" / c).iterdir())
    for name in detect_images[:5]:
        assert (shapes / "detect" / "images" / name).read_bytes() == (shapes / "segment" / "images" / name).read_bytes()


def test_boxes_are_exact_and_masks_agree(shapes):
    coco = json.loads((shapes / "detect" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    by_image = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in coco["images"]:
        mask = np.asarray(Image.open(shapes / "segment" / "masks" / image["file_name"]))
        covered = np.zeros_like(mask, dtype=bool)
        for annotation in by_image[image["id"]]:
            x, y, w, h = annotation["bbox"]
            inside = mask[y : y + h, x : x + w] == annotation["category_id"]
            # every edge of the box touches a visible pixel of its class: the box is tight
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y : y + h, x : x + w] |= inside
        assert np.array_equal(covered, mask > 0)  # the boxes cover every shape pixel


def test_classify_label_is_the_largest_shape(shapes):
    coco = json.loads((shapes / "detect" / "annotations.json").read_text())
    ids = {image["file_name"]: image["id"] for image in coco["images"]}
    for class_name in CLASSES:
        for path in (shapes / "classify" / class_name).iterdir():
            areas = [a for a in coco["annotations"] if a["image_id"] == ids[path.name]]
            largest = max(areas, key=lambda a: a["area"])
            assert CLASSES[largest["category_id"] - 1] == class_name


def test_the_same_seed_gives_the_same_bytes(tmp_path):
    a = write_shapes(tmp_path / "a", num_images=3, size=64, seed=9)
    b = write_shapes(tmp_path / "b", num_images=3, size=64, seed=9)
    assert (a / "detect" / "annotations.json").read_bytes() == (b / "detect" / "annotations.json").read_bytes()
    assert (a / "segment" / "masks" / "000002.png").read_bytes() == (b / "segment" / "masks" / "000002.png").read_bytes()


@pytest.mark.process
def test_cli(tmp_path):
    monaserve = str(Path(sys.executable).with_name("monaserve"))
    result = subprocess.run(
        [monaserve, "demo-data", "shapes", "--out", str(tmp_path), "--images", "5", "--size", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "detect" / "images").iterdir())) == 5
