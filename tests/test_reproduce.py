"""docs/reproduce.md's recipes, each run as written at toy size: the Mona paper's rows as `monaserve train` commands.

Every `bash` block of the page is one recipe: one `monaserve train` command on the ImageNet-22k Swin-L whose
DATA is a placeholder folder (`data/VOCdevkit`). Here each runs in this process on a fake tree of that
dataset (`monaserve.testing.fake_datasets`) with toy overrides appended (a random Swin-T, 64-pixel inputs,
one step, offline), and its package's manifest must record the recipe's own settings, the data format it
read and the dataset's held-out split. A recipe the test does not know, or one it knows that the page lacks,
fails `test_the_page_holds_exactly_the_known_recipes`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from monaserve.adapters.baselines import METHODS
from monaserve.adapters.config_args import config_from_args
from monaserve.adapters.data.formats import read_training_data
from monaserve.adapters.package import read_manifest
from monaserve.adapters.trainer import TrainConfig
from monaserve.server.cli import build_parser, main
from monaserve.testing.fake_datasets import write_ade, write_flowers, write_pets, write_voc

from helpers import TINY

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"

FAKE_TREES: dict[str, Callable[[Path], Path]] = {
    "data/VOCdevkit": lambda root: write_voc(root / "VOCdevkit"),
    "data/ADEChallengeData2016": lambda root: write_ade(root, images=2),
    "data/flowers-102": lambda root: write_flowers(root) / "flowers-102",
    "data/oxford-iiit-pet": lambda root: write_pets(root) / "oxford-iiit-pet",
}
"""Each placeholder DATA folder of the page, and the writer of its fake tree (which returns the folder to train on)."""

RECIPES = {
    "mona-voc0712": "data/VOCdevkit",
    "mona-ade20k": "data/ADEChallengeData2016",
    "mona-flowers102": "data/flowers-102",
    "mona-oxford-pet": "data/oxford-iiit-pet",
    "mona-voc2007": "data/VOCdevkit",
}
"""The recipes the page must hold, by `--name`, with the placeholder DATA each trains on."""

OVERRIDDEN = {"backbone", "weights", "input_size", "head_channels", "batch_size", "max_steps", "workers", "progress", "out", "data"}
"""The TrainConfig fields the toy overrides (or the fake tree) replace: the manifest records the others as the recipe says."""


def toy_overrides(weights: Path, out: Path) -> list[str]:
    """Flags appended to a recipe (argparse keeps the last of a repeated flag): a random Swin-T, toy size, one step, offline."""
    size = ["--input-size", "64", "--head-channels", "16", "--batch-size", "2", "--max-steps", "1"]
    return ["--backbone", TINY, "--weights", str(weights), *size, "--workers", "0", "--no-progress", "--out", str(out)]


def recipes() -> dict[str, list[str]]:
    """The page's recipes by `--name`: each bash block's command as argv, `monaserve` left out."""
    found = {}
    for block in re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), re.DOTALL | re.MULTILINE):
        lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert len(lines) == 1, f"a recipe block holds one command, not {len(lines)}:\n{block}"
        argv = shlex.split(lines[0], comments=True)
        assert argv[:2] == ["monaserve", "train"], f"a recipe is a `monaserve train` command: {lines[0]}"
        found[parse(argv[1:]).name] = argv[1:]
    return found


def parse(argv: list[str]) -> TrainConfig:
    """The TrainConfig the command line `argv` (`train KIND DATA ...`) makes, as `monaserve` parses it."""
    return config_from_args(TrainConfig, build_parser(argv).parse_args(argv))


def given(argv: list[str]) -> dict[str, object]:
    """The settings `argv` gives that differ from their defaults (the fields its flags set)."""
    recipe = parse(argv)
    default = parse(["train", recipe.kind, str(recipe.data), "--name", recipe.name])
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(TrainConfig) if getattr(recipe, f.name) != getattr(default, f.name)}


def training_record(out: Path) -> dict:
    """What a run wrote of itself: the package manifest's `training` field, or the report of a method that changes the backbone."""
    return read_manifest(out).training if out.exists() else json.loads(out.with_suffix(".json").read_text())


def test_the_page_holds_exactly_the_known_recipes():
    """One `monaserve train` command per bash block, each on the ImageNet-22k Swin-L, on a placeholder this test
    has a fake tree for, naming its data format; and every `--baseline` the page names is one `train` offers."""
    found = recipes()
    assert set(found) == set(RECIPES), {"not known here": set(found) - set(RECIPES), "not on the page": set(RECIPES) - set(found)}
    for name, argv in found.items():
        config = parse(argv)
        assert (config.backbone, config.weights) == ("swin_large_patch4_window7_224", "hub"), name
        assert str(config.data) == RECIPES[name] and config.data_format != "auto", name
    named = set(re.findall(r"--baseline ([a-z][\w-]*)", PAGE.read_text()))
    assert named and named <= set(METHODS), f"not a training method: {named - set(METHODS)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_trains_as_written_at_toy_size(name, tiny_weights, tmp_path):
    argv = recipes()[name]
    data = FAKE_TREES[RECIPES[name]](tmp_path / "data")
    argv = [str(data) if arg == RECIPES[name] else arg for arg in argv]
    out = tmp_path / f"{name}.safetensors"
    assert main([*argv, *toy_overrides(tiny_weights, out)]) == 0

    record = training_record(out)
    expected = {field: str(value) if isinstance(value, Path) else value for field, value in given(argv).items() if field not in OVERRIDDEN}
    assert {field: record["config"][field] for field in expected} == expected
    config = parse(argv)
    dataset = read_training_data(config.kind, data, config.data_format)
    assert (record["train_images"], record["val_images"]) == (len(dataset.samples), len(dataset.held_out))
    assert record["steps"] == 1 and record["evaluation"]
