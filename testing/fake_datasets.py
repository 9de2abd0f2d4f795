"""Small fake trees of the Mona paper's datasets in their exact on-disk layouts (real VOC XML, real .mat
files, tiny images, as torchvision's own dataset tests build them), for tests that read or train on them.

Each writer returns the path `monaserve train` takes as DATA. `write_ade` writes as many images per split
as it is told: a smoke training of the segment head needs two (its BatchNorm pools to 1x1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from monaserve.adapters.data.formats import VOC_CLASSES

VOC = {
    "VOC2007": {
        "trainval": {
            "000005": [("dog", (1, 1, 8, 6), 0), ("chair", (2, 2, 5, 5), 1)],
            "000007": [("cat", (3, 2, 7, 6), 0)],
            "000009": [("dog", (1, 1, 4, 6), 0), ("person", (5, 1, 8, 6), 0)],
            "000012": [("bird", (1, 1, 4, 4), 1)],
        },
        "test": {"000001": [("person", (2, 1, 6, 6), 0)]},
    },
    "VOC2012": {"trainval": {"2008_000002": [("tvmonitor", (1, 2, 8, 5), 0)]}},
}
"""Per year and image set: each image's objects (class, 1-based inclusive xmin ymin xmax ymax, difficult), all 8x6 images."""

FLOWERS_LABELS = [1, 2, 3, 1, 2, 102]
"""The class (1..102) of each of the six fake flowers, image_00001 to image_00006."""

FLOWERS_SPLITS = {"trnid": [1, 2], "valid": [3], "tstid": [4, 5, 6]}
"""Which fake flowers each split of `setid.mat` lists: train + val train, test is held out."""

PETS_LISTS = {
    "trainval": ["Abyssinian_100 1 1 1", "american_bulldog_12 2 2 1"],
    "test": ["Abyssinian_101 1 1 1", "american_bulldog_13 2 2 1"],
}
"""The fake Oxford-IIIT Pet lists (`<image> <class id> <species> <breed id>`)."""

ADE_MASK = np.array([[0] * 10 + [1] * 10 + [150] * 8 + [255] * 4] * 32, dtype=np.uint8)
"""A 32x32 ADE20K annotation: "other", the first class, the last class, and 255."""


def write_image(path: Path, size: tuple[int, int] = (8, 6)) -> None:
    """Write a tiny one-colour image (JPEG or PNG by its suffix), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 140, 200)).save(path)


def voc_xml(year: str, image_id: str, objects: list) -> str:
    """A VOC annotation of an 8x6 image as the devkit writes it."""
    parts = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{hard}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2), hard in objects
    )
    return (
        f"<annotation><folder>{year}</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>8</width><height>6</height><depth>3</depth></size><segmented>0</segmented>{parts}</annotation>"
    )


def class_flag(objects: list, name: str) -> int:
    """A VOC per-class list's flag: 1 present, 0 only difficult objects of it, -1 absent."""
    flags = [0 if hard else 1 for n, _, hard in objects if n == name]
    return max(flags, default=-1)


def write_voc(devkit: Path) -> Path:
    """Write a VOCdevkit (annotations, images, image sets and per-class lists of `VOC`) and return it."""
    for year, sets in VOC.items():
        main = devkit / year / "ImageSets" / "Main"
        main.mkdir(parents=True)
        for split, images in sets.items():
            (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
            for name in VOC_CLASSES:
                (main / f"{name}_{split}.txt").write_text("".join(f"{i} {class_flag(o, name):2d}\n" for i, o in images.items()))
            for image_id, objects in images.items():
                write_image(devkit / year / "JPEGImages" / f"{image_id}.jpg")
                (devkit / year / "Annotations").mkdir(exist_ok=True)
                (devkit / year / "Annotations" / f"{image_id}.xml").write_text(voc_xml(year, image_id, objects))
    return devkit


def write_flowers(root: Path) -> Path:
    """Write torchvision's flowers-102/ under `root` (six images, `imagelabels.mat` and `setid.mat` with the
    originals' keys, shapes and dtypes) and return `root`."""
    base = root / "flowers-102"
    for i in range(1, len(FLOWERS_LABELS) + 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([FLOWERS_LABELS], dtype=np.uint8)})
    scipy.io.savemat(base / "setid.mat", {key: np.array([value], dtype=np.uint16) for key, value in FLOWERS_SPLITS.items()})
    return root


def write_pets(root: Path) -> Path:
    """Write torchvision's oxford-iiit-pet/ under `root` (the images and lists of `PETS_LISTS`) and return `root`."""
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, lines in PETS_LISTS.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            write_image(base / "images" / f"{line.split()[0]}.jpg")
    return root


def write_ade(root: Path, images: int = 1) -> Path:
    """Write ADEChallengeData2016/ under `root` (`images` training and validation images, each with the
    annotation `ADE_MASK`) and return that folder."""
    base = root / "ADEChallengeData2016"
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        (base / "annotations" / split).mkdir(parents=True)
        for number in range(1, images + 1):
            name = f"{prefix}_{number:08d}"
            write_image(base / "images" / split / f"{name}.jpg", (32, 32))
            Image.fromarray(ADE_MASK, mode="L").save(base / "annotations" / split / f"{name}.png")
    return base
