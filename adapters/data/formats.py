"""The layouts training data is read from, as a registry (`FORMATS`): each format's name, the kind it serves,
its layout in one line, a test that recognises it on disk, and its reader. `read_training_data` picks one by
name, or (`auto`) the one of the kind that recognises the path.

Besides the general formats (ImageFolder, COCO json, images + masks), the Mona paper's datasets are read as
they ship (in torchvision's layout where it has one): Pascal VOC detection and VOC2007 classification,
ADE20K, Oxford 102 Flowers and Oxford-IIIT Pet. Where a dataset ships an evaluation split, its reader puts
it in `TaskData.held_out`, which the trainer validates on instead of a random split.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import (
    IMAGE_SUFFIXES,
    REDUCE_ZERO_LABEL,
    Sample,
    TaskData,
    coco_detection,
    detection_target,
    image_folder,
    image_masks,
    mask_samples,
)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""Pascal VOC's 20 classes in the standard (devkit) order."""

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
"""ADE20K's 150 classes, mask values 1..150 (mmseg's `ADE20KDataset` classes; its "bed " without the stray space)."""

FLOWERS102_CLASSES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip
"""Oxford 102 Flowers' names for labels 1..102: torchvision's `Flowers102.classes` (added in 2025, so written out
here for the older torchvision this package allows), which agrees with tensorflow-datasets' list and with the
per-class image counts on the dataset's page."""

VOC_SETS = Path("ImageSets", "Main")


@dataclass(frozen=True)
class DataFormat:
    """One layout of one kind's training data."""

    name: str
    kind: str
    description: str
    """What `data` must be, in one line (errors and `docs/training.md` show it)."""
    recognises: Callable[[Path], bool]
    """Whether `data` has this layout, from a few file tests (nothing is read)."""
    read: Callable[[Path, Path | None, Path | None], TaskData]
    """(data, masks, images) -> the dataset."""
    catch_all: bool = False
    """A layout that other formats' folders have too (a folder of folders): `auto` takes it only when no other format does."""


def read_training_data(kind: str, data: Path, data_format: str = "auto", masks: Path | None = None, images: Path | None = None) -> TaskData:
    """`kind`'s training data at `data`, read in `data_format` (`auto`: the one of the kind's formats that recognises it)."""
    data = Path(data)
    chosen = recognised_format(kind, data) if data_format == "auto" else named_format(kind, data_format)
    return chosen.read(data, masks, images)


def formats_of(kind: str) -> list[DataFormat]:
    """The formats `kind`'s data may come in."""
    return [f for f in FORMATS.values() if f.kind == kind]


def named_format(kind: str, name: str) -> DataFormat:
    """The format called `name`; a ValueError lists `kind`'s where it is unknown or of another kind."""
    chosen = FORMATS.get(name)
    if chosen is None or chosen.kind != kind:
        problem = f"unknown data format {name!r}" if chosen is None else f"{name!r} is a {chosen.kind} data format"
        raise ValueError(f"{problem}; {kind} data formats: auto, {', '.join(f.name for f in formats_of(kind))}")
    return chosen


def recognised_format(kind: str, data: Path) -> DataFormat:
    """The one format of `kind` that recognises `data` (a catch-all only where no other does); a ValueError says
    what each expects where none does, or which to name where several do."""
    if not data.exists():
        raise ValueError(f"{data}: no such file or folder")
    candidates = formats_of(kind)
    matches = [f for f in candidates if f.recognises(data)]
    matches = [f for f in matches if not f.catch_all] or matches
    if not matches:
        tried = "; ".join(f"{f.name}: {f.description}" for f in candidates)
        raise ValueError(f"{data}: no {kind} data format recognises it. Tried {tried}")
    if len(matches) > 1:
        raise ValueError(f"{data} looks like {' and '.join(f.name for f in matches)} data: name the format (--data-format)")
    return matches[0]


# ---- the Mona paper's datasets ------------------------------------------------------------------


def voc_years(data: Path) -> list[Path]:
    """The VOC20xx folders (with `Annotations/` and `ImageSets/Main/`) that `data` is or holds (a VOCdevkit)."""
    folders = [data] if (data / VOC_SETS).is_dir() else sorted(data.glob("VOC20*"))
    return [f for f in folders if (f / "Annotations").is_dir() and (f / VOC_SETS).is_dir()]


def voc_detection(data: Path) -> TaskData:
    """Pascal VOC detection as mmdet's voc0712 config (Mona's VOC runs) reads it: every year's `trainval`
    images train, and the `test` images of the years that list them (VOC2007; VOC2012 ships none) are held out.
    `data` is a VOCdevkit or one VOC20xx folder.

    VOC's boxes are 1-based inclusive pixel indices; they become xyxy pixel coordinates as detectron2 converts
    them, (xmin - 1, ymin - 1, xmax, ymax), so a box over a whole W x H image is (0, 0, W, H). (mmdet 3
    subtracts 1 from all four, a box 1 pixel short of its right and bottom edges; torchvision's VOCDetection
    leaves the XML's strings as they are.) `difficult` objects are left out of the targets, trained and held
    out alike: mmdet keeps them as boxes to ignore, which these targets cannot say; the notes count them.
    """
    years = voc_years(data)
    if not years:
        raise ValueError(f"{data}: no VOC20xx folder with Annotations/ and {VOC_SETS}/ (expected a VOCdevkit or one VOC20xx folder)")
    tests = [year for year in years if (year / VOC_SETS / "test.txt").exists()]
    train = [(year, name) for year in years for name in _image_set(year / VOC_SETS / "trainval.txt")]
    test = [(year, name) for year in tests for name in _image_set(year / VOC_SETS / "test.txt")]
    samples, difficult = _voc_samples(train + test)
    held_out = samples[len(train) :] if tests else None
    return TaskData(list(VOC_CLASSES), samples[: len(train)], held_out, [f"voc: {difficult:,} difficult objects left out of the targets"])


def _voc_samples(images: list[tuple[Path, str]]) -> tuple[list[Sample], int]:
    """The samples of (VOC20xx folder, image id) pairs, numbered from 1, and how many difficult objects they leave out."""
    samples, difficult = [], 0
    for number, (year, name) in enumerate(images, start=1):
        objects = _voc_objects(year / "Annotations" / f"{name}.xml")
        kept = [(box, label) for box, label, hard in objects if not hard]
        difficult += len(objects) - len(kept)
        samples.append(Sample(year / "JPEGImages" / f"{name}.jpg", detection_target([b for b, _ in kept], [c for _, c in kept], number)))
    return samples, difficult


def _list_lines(path: Path, expected: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, line, its fields) of each line of a dataset's list file that holds something (not blank,
    not a `#` comment); a missing file is a ValueError saying what its lines should be (`expected`)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (expected {expected} lines)")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            yield number, line, fields


def _image_set(path: Path) -> list[str]:
    """The image ids a VOC `ImageSets` list names, one a line."""
    return [fields[0] for _, _, fields in _list_lines(path, "a VOC image set: '<image id>'")]


def _voc_objects(xml: Path) -> list[tuple[list[float], int, bool]]:
    """(xyxy box, label, difficult) of each object a VOC annotation holds; a ValueError names the file and its fault."""
    if not xml.is_file():
        raise ValueError(f"{xml}: missing (expected the VOC annotation of an image its image set lists)")
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml}: not a VOC annotation ({e})") from None
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{xml}: unknown class {name!r} (expected one of VOC's 20: {', '.join(VOC_CLASSES)})")
        try:
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{side}", "")) for side in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise ValueError(f"{xml}: a {name!r} object without a numeric bndbox (expected xmin, ymin, xmax, ymax)") from None
        objects.append(([x1 - 1, y1 - 1, x2, y2], VOC_CLASSES.index(name), (obj.findtext("difficult") or "0").strip() == "1"))
    return objects


def voc_classification(year: Path) -> TaskData:
    """VOC classification (a VOC20xx folder's `ImageSets/Main/<class>_{trainval,test}.txt`) as single-label data:
    `trainval` trains and `test` (VOC2007's) is held out, keeping only the images in which exactly one class is
    present (flag 1, or 0: only difficult objects of it), labelled with that class.

    VOC classification is multi-label; this kind is one softmax over the classes. Mona's official code feeds
    mmcls lists of `<image> <label>` and, where a line holds several labels (`3,8,14`), trains and tests on
    the first one written, an order its (unpublished) lists fix. Keeping the single-class images instead
    gives every kept image one right answer, in training and evaluation alike, at the cost of the images
    with several classes; the notes count them per split.
    """
    train, train_note = _single_class_images(year, "trainval")
    if not (year / VOC_SETS / f"{VOC_CLASSES[0]}_test.txt").exists():
        return TaskData(list(VOC_CLASSES), train, notes=[train_note])
    test, test_note = _single_class_images(year, "test")
    return TaskData(list(VOC_CLASSES), train, test, [train_note, test_note])


def _single_class_images(year: Path, split: str) -> tuple[list[Sample], str]:
    """The images of `split` in which exactly one class is present, with it as their label, and a note counting the rest."""
    present: dict[str, list[int]] = {}
    for label, name in enumerate(VOC_CLASSES):
        for image_id, flag in _class_flags(year / VOC_SETS / f"{name}_{split}.txt"):
            present.setdefault(image_id, []).extend([label] if flag >= 0 else [])
    kept = [Sample(year / "JPEGImages" / f"{image_id}.jpg", labels[0]) for image_id, labels in present.items() if len(labels) == 1]
    return kept, f"voc-cls {split}: {len(kept):,} images with one class kept, {len(present) - len(kept):,} with several left out"


def _class_flags(path: Path) -> list[tuple[str, int]]:
    """(image id, flag) of each line of a VOC per-class list: 1 present, 0 present but difficult, -1 absent."""
    flags = []
    for number, line, fields in _list_lines(path, "a VOC per-class list: '<image id> <1|0|-1>'"):
        if len(fields) != 2 or fields[1] not in ("1", "0", "-1"):
            raise ValueError(f"{path}:{number}: {line!r} (expected '<image id> <1|0|-1>')")
        flags.append((fields[0], int(fields[1])))
    return flags


def ade20k(root: Path) -> TaskData:
    """ADE20K as the scene-parsing challenge ships it (ADEChallengeData2016): `training` trains, `validation`
    is held out. Masks hold 0 for "other" (no class) and 1..150 for the classes; they are read as mmseg's
    `reduce_zero_label` reads them (0 is ignored, k is class k-1), so the labels are ADE20K's 150 classes."""
    folders = {split: (root / "images" / split, root / "annotations" / split) for split in ("training", "validation")}
    for images, masks in folders.values():
        if not images.is_dir() or not masks.is_dir():
            raise ValueError(f"{root}: expected {images} and {masks} (ADE20K's images and annotations)")
    training, validation = (mask_samples(images, masks, REDUCE_ZERO_LABEL) for images, masks in folders.values())
    return TaskData(list(ADE20K_CLASSES), training, held_out=validation)


def flowers102(root: Path) -> TaskData:
    """Oxford 102 Flowers in torchvision's layout (flowers-102/: `jpg/image_00001.jpg`.., `imagelabels.mat`,
    `setid.mat`): the `trnid` and `valid` images train and the `tstid` ones are held out, as in the Mona paper
    (its configs train on one list and validate and test on the test list). Label = imagelabels' 1..102 less one."""
    labels = _mat_vector(root / "imagelabels.mat", "labels")
    if labels.size == 0 or labels.min() < 1 or labels.max() > len(FLOWERS102_CLASSES):
        raise ValueError(f"{root / 'imagelabels.mat'}: labels outside 1..{len(FLOWERS102_CLASSES)}")

    def samples(key: str) -> list[Sample]:
        """The images `setid.mat` lists under `key`, with their labels."""
        ids = _mat_vector(root / "setid.mat", key)
        if ids.size and (ids.min() < 1 or ids.max() > labels.size):
            raise ValueError(f"{root / 'setid.mat'}: {key} has image ids outside 1..{labels.size} (imagelabels.mat's)")
        return [Sample(root / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in ids.tolist()]

    return TaskData(list(FLOWERS102_CLASSES), samples("trnid") + samples("valid"), held_out=samples("tstid"))


def _mat_vector(path: Path, key: str) -> np.ndarray:
    """The integer vector `key` of a MATLAB file (scipy imported here: serving never needs it)."""
    from scipy.io import loadmat

    if not path.is_file():
        raise ValueError(f"{path}: missing")
    values = loadmat(path).get(key)
    if values is None:
        raise ValueError(f"{path}: no {key!r} (expected Oxford 102 Flowers' {path.name})")
    return np.asarray(values).ravel().astype(np.int64)


def oxford_pet(root: Path) -> TaskData:
    """Oxford-IIIT Pet in torchvision's layout (oxford-iiit-pet/: `images/<Breed_name>_<n>.jpg`,
    `annotations/{trainval,test}.txt` with `<image> <class id 1..37> <species> <breed id>` lines): trainval
    trains and test is held out (the paper's split). Breed names are made from the image names as torchvision
    makes them (`american_bulldog_12` -> `American Bulldog`), in class id order."""
    lists = {split: _pet_list(root / "annotations" / f"{split}.txt") for split in ("trainval", "test")}
    names: dict[int, str] = {}
    for stem, label in lists["trainval"] + lists["test"]:
        name = " ".join(part.title() for part in stem.rsplit("_", 1)[0].split("_"))
        if names.setdefault(label, name) != name:
            raise ValueError(f"{root / 'annotations'}: class id {label + 1} names both {names[label]!r} and {name!r} images")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{root / 'annotations'}: class ids {sorted(names)} are not 1..{len(names)} (ids start at 1, none left out)")

    def samples(split: str) -> list[Sample]:
        """The images of `split`, with their labels."""
        return [Sample(root / "images" / f"{stem}.jpg", label) for stem, label in lists[split]]

    return TaskData([names[i] for i in range(len(names))], samples("trainval"), held_out=samples("test"))


def _pet_list(path: Path) -> list[tuple[str, int]]:
    """(image name, label) of each line of an Oxford-IIIT Pet list (`<image> <class id> <species> <breed id>`)."""
    entries = []
    for number, line, fields in _list_lines(path, "'<image> <class id> <species> <breed id>'"):
        if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) < 1:
            raise ValueError(f"{path}:{number}: {line!r} (expected '<image> <class id from 1> <species> <breed id>')")
        entries.append((fields[0], int(fields[1]) - 1))
    return entries


# ---- the registry -------------------------------------------------------------------------------


def _shipped(name: str, kind: str, description: str, marker: str, folder: str, read: Callable[[Path], TaskData]) -> DataFormat:
    """A dataset as it ships: read from the folder that holds `marker`, `data` itself or `data/folder` (as
    torchvision's root is the folder above)."""

    def root(data: Path) -> Path | None:
        return next((candidate for candidate in (data, data / folder) if (candidate / marker).exists()), None)

    def read_data(data: Path, masks: Path | None, images: Path | None) -> TaskData:
        found = root(data)
        if found is None:
            raise ValueError(f"{data}: not {name} data (expected {description})")
        return read(found)

    return DataFormat(name, kind, description, lambda data: root(data) is not None, read_data)


def _read_image_masks(data: Path, masks: Path | None, images: Path | None) -> TaskData:
    """`image_masks`, whose masks folder is given apart (`--masks`)."""
    if masks is None:
        raise ValueError("segment training needs --masks (a folder of PNG class-id masks)")
    return image_masks(data, masks)


def _holds_images(data: Path) -> bool:
    """Whether `data` is a folder with images in it (cheap: stops at the first)."""
    return data.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in data.iterdir())


FORMATS: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat(
            "imagefolder",
            "classify",
            "a folder of class folders of images (<data>/<class>/<image>)",
            lambda data: data.is_dir() and any(p.is_dir() for p in data.iterdir()),
            lambda data, masks, images: image_folder(data),
            catch_all=True,
        ),
        _shipped(
            "voc-cls",
            "classify",
            "VOC2007/ (or a VOCdevkit/ holding it) with JPEGImages/ and ImageSets/Main/<class>_{trainval,test}.txt",
            f"{VOC_SETS}/{VOC_CLASSES[0]}_trainval.txt",
            "VOC2007",
            voc_classification,
        ),
        _shipped(
            "flowers102",
            "classify",
            "flowers-102/ (or the folder holding it) with jpg/image_00001.jpg.., imagelabels.mat, setid.mat",
            "setid.mat",
            "flowers-102",
            flowers102,
        ),
        _shipped(
            "oxford-pet",
            "classify",
            "oxford-iiit-pet/ (or the folder holding it) with images/*.jpg, annotations/{trainval,test}.txt",
            "annotations/trainval.txt",
            "oxford-iiit-pet",
            oxford_pet,
        ),
        DataFormat(
            "coco",
            "detect",
            "a COCO json file, its images in images/ beside it (or --images)",
            lambda data: data.is_file() and data.suffix.lower() == ".json",
            lambda data, masks, images: coco_detection(data, images),
        ),
        DataFormat(
            "voc",
            "detect",
            "VOCdevkit/ (or one VOC20xx/) with VOC20xx/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{trainval,test}.txt}",
            lambda data: bool(voc_years(data)),
            lambda data, masks, images: voc_detection(data),
        ),
        DataFormat(
            "masks",
            "segment",
            "a folder of images, --masks a folder of <image stem>.png class-id masks, classes.json beside the images folder",
            _holds_images,
            _read_image_masks,
        ),
        _shipped(
            "ade20k",
            "segment",
            "ADEChallengeData2016/ (or the folder holding it) with {images,annotations}/{training,validation}/",
            "annotations/training",
            "ADEChallengeData2016",
            ade20k,
        ),
    )
}
"""Every data format, by name."""
