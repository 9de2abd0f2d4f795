"""Training data formats: the Mona paper's datasets read from small fake trees in their exact on-disk layouts
(real VOC XML, real .mat files, tiny images, as torchvision's own dataset tests build them), their labels,
splits and boxes, ADE20K's mask remapping as training reads it, auto-detection, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.datasets import Flowers102

from monaserve.adapters.data.datasets import Sample, TaskData
from monaserve.adapters.data.formats import ADE20K_CLASSES, FLOWERS102_CLASSES, VOC_CLASSES, read_training_data
from monaserve.adapters.data.shapes import write_shapes
from monaserve.adapters.kinds import get_kind
from monaserve.adapters.transforms import IGNORE_INDEX, InputSpec, preprocess
from monaserve.testing.fake_datasets import voc_xml, write_ade, write_flowers, write_pets, write_voc


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """Every format's tree, written once: the paper's datasets and the shapes data (ImageFolder, COCO, masks)."""
    root = tmp_path_factory.mktemp("formats")
    shapes = write_shapes(root / "shapes", num_images=4, size=32, seed=0)
    return {
        "voc": write_voc(root / "VOCdevkit"),
        "flowers": write_flowers(root / "torchvision-flowers"),
        "pets": write_pets(root / "torchvision-pets"),
        "ade": write_ade(root / "ade"),
        "imagefolder": shapes / "classify",
        "coco": shapes / "detect" / "annotations.json",
        "masks": shapes / "segment" / "images",
    }


def names(samples: list[Sample]) -> list[str]:
    return [s.path.stem for s in samples]


def test_voc_detection_trains_on_0712_trainval_and_holds_out_2007_test(trees):
    data = read_training_data("detect", trees["voc"])
    assert tuple(data.labels) == VOC_CLASSES
    assert names(data.samples) == ["000005", "000007", "000009", "000012", "2008_000002"]
    assert names(data.held_out) == ["000001"]
    assert data.split(0.5) == (data.samples, data.held_out)
    dog = data.samples[0].target  # the difficult chair is left out; (1, 1, 8, 6) covers the whole 8x6 image
    assert dog["boxes"].tolist() == [[0.0, 0.0, 8.0, 6.0]] and dog["labels"].tolist() == [VOC_CLASSES.index("dog")]
    assert dog["boxes"].dtype == torch.float32 and dog["labels"].dtype == torch.int64
    assert data.samples[3].target["boxes"].shape == (0, 4)  # only a difficult bird
    assert data.samples[4].path == trees["voc"] / "VOC2012" / "JPEGImages" / "2008_000002.jpg"
    assert len({int(s.target["image_id"]) for s in data.samples + data.held_out}) == 6
    assert data.notes == ["voc: 2 difficult objects left out of the targets"]


def test_one_voc_year_without_a_test_set_splits_at_random(trees):
    data = read_training_data("detect", trees["voc"] / "VOC2012", "voc")
    assert names(data.samples) == ["2008_000002"] and data.held_out is None
    assert data.samples[0].target["boxes"].tolist() == [[0.0, 1.0, 8.0, 5.0]]


def test_voc_errors_name_the_file(trees, tmp_path):
    year = write_voc(tmp_path / "VOCdevkit") / "VOC2007"
    (year / "Annotations" / "000007.xml").write_text(voc_xml("VOC2007", "000007", [("dragon", (1, 1, 2, 2), 0)]))
    with pytest.raises(ValueError, match=r"000007\.xml: unknown class 'dragon'.*aeroplane"):
        read_training_data("detect", year)
    (year / "Annotations" / "000007.xml").unlink()
    with pytest.raises(ValueError, match=r"000007\.xml: missing"):
        read_training_data("detect", year)


def test_voc2007_classification_keeps_the_images_of_one_class(trees):
    data = read_training_data("classify", trees["voc"])  # a VOCdevkit: its VOC2007
    assert tuple(data.labels) == VOC_CLASSES
    assert [(s.path.stem, data.labels[s.target]) for s in data.samples] == [("000007", "cat"), ("000012", "bird")]
    assert [(s.path.stem, data.labels[s.target]) for s in data.held_out] == [("000001", "person")]
    assert data.notes == [
        "voc-cls trainval: 2 images with one class kept, 2 with several left out",
        "voc-cls test: 1 images with one class kept, 0 with several left out",
    ]
    assert read_training_data("classify", trees["voc"] / "VOC2012").held_out is None


def test_voc_classification_errors_name_the_list(tmp_path):
    year = write_voc(tmp_path / "VOCdevkit") / "VOC2007"
    (year / "ImageSets" / "Main" / "cat_trainval.txt").write_text("000005 -1\n000007 yes\n")
    with pytest.raises(ValueError, match=r"cat_trainval\.txt:2: '000007 yes'"):
        read_training_data("classify", year, "voc-cls")
    (year / "ImageSets" / "Main" / "cat_trainval.txt").unlink()
    with pytest.raises(ValueError, match=r"cat_trainval\.txt: missing"):
        read_training_data("classify", year, "voc-cls")


def test_flowers102_trains_on_train_and_val_and_holds_out_test(trees):
    data = read_training_data("classify", trees["flowers"])
    assert len(data.labels) == 102 and data.labels[0] == "pink primrose" and data.labels[101] == "blackberry lily"
    assert names(data.samples) == ["image_00001", "image_00002", "image_00003"]
    assert [s.target for s in data.samples] == [0, 1, 2]
    assert [s.target for s in data.held_out] == [0, 1, 101]
    assert read_training_data("classify", trees["flowers"] / "flowers-102").samples == data.samples


@pytest.mark.skipif(not hasattr(Flowers102, "classes"), reason="this torchvision has no Flowers102.classes")
def test_flower_names_are_torchvisions():
    assert FLOWERS102_CLASSES == tuple(Flowers102.classes)


def test_flowers102_errors_name_the_file(tmp_path):
    base = write_flowers(tmp_path) / "flowers-102"
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[1]], dtype=np.uint16)})
    with pytest.raises(ValueError, match=r"setid\.mat: no 'valid'"):
        read_training_data("classify", base)


def test_oxford_pet_names_breeds_as_torchvision_does(trees):
    data = read_training_data("classify", trees["pets"])
    assert data.labels == ["Abyssinian", "American Bulldog"]
    assert [(s.path.name, s.target) for s in data.samples] == [("Abyssinian_100.jpg", 0), ("american_bulldog_12.jpg", 1)]
    assert [(s.path.name, s.target) for s in data.held_out] == [("Abyssinian_101.jpg", 0), ("american_bulldog_13.jpg", 1)]


def test_oxford_pet_errors_name_the_line(tmp_path):
    base = write_pets(tmp_path) / "oxford-iiit-pet"
    (base / "annotations" / "test.txt").write_text("Abyssinian_101 one 1 1\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: 'Abyssinian_101 one 1 1'"):
        read_training_data("classify", base)


def test_ade20k_masks_reach_training_as_mmseg_reduces_them(trees):
    data = read_training_data("segment", trees["ade"].parent)
    assert tuple(data.labels) == ADE20K_CLASSES and len(data.labels) == 150 and data.labels[7] == "bed"
    assert names(data.samples) == ["ADE_train_00000001"] and names(data.held_out) == ["ADE_val_00000001"]
    spec = InputSpec(size=(32, 32))
    sample = data.samples[0]
    target = get_kind("segment").target(sample, preprocess(Image.open(sample.path), spec), False, spec)
    expected = np.array([[IGNORE_INDEX] * 10 + [0] * 10 + [149] * 8 + [IGNORE_INDEX] * 4] * 32)
    assert torch.equal(target, torch.from_numpy(expected))
    flipped = get_kind("segment").target(sample, preprocess(Image.open(sample.path), spec), True, spec)
    assert torch.equal(flipped, target.flip(-1))


def test_plain_masks_reach_training_unchanged(trees):
    data = read_training_data("segment", trees["masks"], masks=trees["masks"].parent / "masks")
    spec = InputSpec(size=(32, 32))
    sample = data.samples[0]
    target = get_kind("segment").target(sample, preprocess(Image.open(sample.path), spec), False, spec)
    assert torch.equal(target, torch.from_numpy(np.asarray(Image.open(sample.target.path), dtype=np.int64)))


def test_ade20k_without_an_annotation_names_it(tmp_path):
    base = write_ade(tmp_path)
    (base / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png"):
        read_training_data("segment", base)


@pytest.mark.parametrize(
    ("kind", "tree", "name"),
    [
        ("classify", "imagefolder", "imagefolder"),
        ("classify", "voc", "voc-cls"),
        ("classify", "flowers", "flowers102"),
        ("classify", "pets", "oxford-pet"),
        ("detect", "coco", "coco"),
        ("detect", "voc", "voc"),
        ("segment", "masks", "masks"),
        ("segment", "ade", "ade20k"),
    ],
)
def test_auto_reads_each_tree_as_its_format(trees, kind, tree, name):
    masks = trees["masks"].parent / "masks" if name == "masks" else None
    auto = read_training_data(kind, trees[tree], masks=masks)
    named = get_kind(kind).read_data(trees[tree], masks=masks, data_format=name)
    assert auto.labels == named.labels and names(auto.samples) == names(named.samples) and len(auto.samples) > 0


def test_auto_errors_say_what_each_format_expects(trees, tmp_path):
    with pytest.raises(ValueError, match=r"no detect data format recognises it. Tried coco: a COCO json.*; voc: VOCdevkit/"):
        read_training_data("detect", tmp_path)
    with pytest.raises(ValueError, match="no such file or folder"):
        read_training_data("classify", tmp_path / "absent")
    both = tmp_path / "both"
    write_flowers(both), write_pets(both)
    with pytest.raises(ValueError, match=r"looks like flowers102 and oxford-pet data: name the format \(--data-format\)"):
        read_training_data("classify", both)
    with pytest.raises(ValueError, match="needs --masks"):
        read_training_data("segment", trees["masks"])


def test_a_named_format_must_be_the_kinds(trees):
    classify_formats = "classify data formats: auto, imagefolder, voc-cls, flowers102, oxford-pet"
    with pytest.raises(ValueError, match=rf"'voc' is a detect data format; {classify_formats}"):
        read_training_data("classify", trees["voc"], "voc")
    with pytest.raises(ValueError, match=r"unknown data format 'yolo'; detect data formats: auto, coco, voc"):
        read_training_data("detect", trees["voc"], "yolo")
    with pytest.raises(ValueError, match=r"not flowers102 data \(expected flowers-102/"):
        read_training_data("classify", trees["imagefolder"], "flowers102")


def test_split_validates_on_the_held_out_samples_where_there_are_some():
    samples = [Sample(Path(f"{i}.jpg"), i % 2) for i in range(10)]
    train, val = TaskData(["a", "b"], samples).split(0.2, seed=1)
    assert len(train) == 8 and len(val) == 2 and sorted(train + val, key=lambda s: s.path) == sorted(samples, key=lambda s: s.path)
    assert TaskData(["a", "b"], samples).split(0.2, seed=1) == (train, val)
    held_out = [Sample(Path("test.jpg"), 0)]
    assert TaskData(["a", "b"], samples, held_out).split(0.2, seed=1) == (samples, held_out)
