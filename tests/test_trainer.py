"""`monaserve train`: each kind learns on tiny shapes data, resumes from checkpoints, and its packages serve."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch

from monaserve.adapters import AdapterPackage, Backbone, InputSpec, check_compatible
from monaserve.adapters.data.datasets import TaskDataset, coco_detection, image_masks
from monaserve.adapters.data.shapes import write_shapes
from monaserve.adapters.kinds import get_kind
from monaserve.adapters.synthetic import make_manifest, random_package
from monaserve.adapters.task_model import MonaTaskModel
from monaserve.adapters.trainer import TrainConfig, parameter_groups, train, warmup_cosine

from server_harness import TOKEN, ServerProcess, image_bytes

KINDS = ("classify", "detect", "segment")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), num_images=10, size=64, seed=1)


def make_config(kind: str, shapes: Path, weights: Path, out: Path, **overrides) -> TrainConfig:
    data = {"classify": shapes / "classify", "detect": shapes / "detect" / "annotations.json", "segment": shapes / "segment" / "images"}
    settings = dict(
        kind=kind,
        data=data[kind],
        name=f"shapes-{kind}",
        masks=shapes / "segment" / "masks" if kind == "segment" else None,
        weights=str(weights),
        input_size=64,
        head_channels=32,
        batch_size=8,
        val_fraction=0.2,
        lr=5e-3,
        warmup_steps=1,
        workers=0,
        progress=False,
        out=out / f"{kind}.safetensors",
    )
    if kind == "detect":
        settings["lr"] = 1e-3
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(shapes, tiny_weights, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("packages")
    return {kind: train(make_config(kind, shapes, tiny_weights, out, epochs=8), log=lambda _: None) for kind in KINDS}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_and_the_package_records_the_evaluation(trained, kind):
    result = trained[kind]
    assert len(result.losses) == 8  # 8 training images, one batch per epoch
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    package = AdapterPackage.read(result.path)
    training = package.manifest.training
    assert training["evaluation"] == result.evaluation and training["untrained_evaluation"] == result.untrained
    assert (training["train_images"], training["val_images"], training["steps"]) == (8, 2, 8)
    picks = {"f1", "f1_min_score", "f1_agnostic", "f1_agnostic_min_score"}
    metrics = {"classify": {"top1", "top5"}, "detect": {"mAP", "mAP50", *picks}, "segment": {"mIoU", "pixel_accuracy"}}
    assert set(result.evaluation) == metrics[kind]
    if kind == "detect":  # the answers' defaults are those of the validation data's best F1, where a box was right
        head, evaluation = package.manifest.head, result.evaluation
        if max(evaluation["f1"], evaluation["f1_agnostic"]) == 0:
            assert (head.min_score, head.class_agnostic) == (0.3, False)
        else:
            picked = "f1_agnostic_min_score" if head.class_agnostic else "f1_min_score"
            assert head.min_score == pytest.approx(max(0.05, evaluation[picked]))
            assert head.class_agnostic == (evaluation["f1_agnostic"] > evaluation["f1"])
    assert training["trainable_parameters"] > 1_408_128  # Mona on Swin-T plus the head


@pytest.mark.process
def test_trained_packages_hot_load_and_serve(trained, tiny_weights, tmp_path):
    with ServerProcess(tiny_weights, tmp_path / "store", "--admin-token", TOKEN, log=tmp_path / "log") as server:
        with server.client() as client:
            for kind, result in trained.items():
                assert client.put(f"/v1/adapters/shapes-{kind}", content=result.path.read_bytes()).status_code == 201
                response = client.post(
                    f"/v1/tasks/shapes-{kind}/{kind}", files={"image": ("x.png", image_bytes(1, size=(64, 64), fmt="PNG"))}
                )
                assert response.status_code == 200, response.text
                assert response.json()["kind"] == kind


def test_checkpoints_resume_where_they_stopped(shapes, tiny_weights, tmp_path):
    messages: list[str] = []
    first = make_config("classify", shapes, tiny_weights, tmp_path, epochs=2, checkpoint_dir=tmp_path / "ck")
    train(first, log=messages.append)
    assert (tmp_path / "ck" / "last.safetensors").exists()
    resumed = make_config("classify", shapes, tiny_weights, tmp_path, epochs=3, checkpoint_dir=tmp_path / "ck", resume=True)
    result = train(resumed, log=messages.append)
    assert any(m.startswith("resumed from") and "epoch 2, step 2" in m for m in messages)
    assert len(result.losses) == 1 and AdapterPackage.read(result.path).manifest.training["steps"] == 3


def test_parameter_report_matches_the_reference_figures(shapes, tiny_weights, tmp_path):
    messages: list[str] = []
    train(make_config("classify", shapes, tiny_weights, tmp_path, max_steps=1), log=messages.append)
    report = next(m for m in messages if m.startswith("parameters:"))
    assert "Mona 1,408,128 + head 3,843" in report and "frozen 27,519,354" in report


@pytest.mark.process
def test_cli(shapes, tiny_weights, tmp_path):
    monaserve = str(Path(sys.executable).with_name("monaserve"))
    out = tmp_path / "cli.safetensors"
    command = [
        monaserve,
        "train",
        "segment",
        str(shapes / "segment" / "images"),
        "--masks",
        str(shapes / "segment" / "masks"),
        "--name",
        "cli",
        "--weights",
        str(tiny_weights),
        "--input-size",
        "64",
        "--head-channels",
        "16",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parameters: trainable" in result.stdout and out.exists()
    missing = subprocess.run(command[:4] + command[6:], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "needs --masks" in missing.stderr


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(warmup=4, total=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0)
    assert all(factor(s) >= factor(s + 1) for s in range(4, 20))


def test_head_only_baseline_trains_the_head_and_still_serves(shapes, tiny_weights, tmp_path, shared_backbone):
    messages: list[str] = []
    result = train(make_config("classify", shapes, tiny_weights, tmp_path, max_steps=2, baseline="head-only"), log=messages.append)
    assert "parameters: trainable 3,843 (head 3,843), frozen" in next(m for m in messages if m.startswith("parameters:"))
    package = AdapterPackage.read(result.path)
    assert package.manifest.training["method"] == "head-only"
    project2 = [t for name, t in package.tensors.items() if ".project2." in name]
    assert project2 and all(not t.any() for t in project2)  # every Mona is the identity
    check_compatible(package, shared_backbone)


def test_full_baseline_trains_the_backbone_and_reports(shapes, tiny_weights, tmp_path):
    messages: list[str] = []
    result = train(make_config("classify", shapes, tiny_weights, tmp_path, max_steps=1, baseline="full"), log=messages.append)
    report = next(m for m in messages if m.startswith("parameters:"))
    assert "backbone 27,519,354 + head 3,843" in report
    assert result.package is None and result.path.suffix == ".json"
    summary = json.loads(result.path.read_text())
    assert summary["method"] == "full" and set(summary["evaluation"]) == {"top1", "top5"}


def test_augmentation_keeps_boxes_and_masks_on_their_pixels(shapes):
    spec = InputSpec(size=(64, 64))
    random.seed(3)
    detect = coco_detection(shapes / "detect" / "annotations.json")
    masks = image_masks(shapes / "segment" / "images", shapes / "segment" / "masks")
    plain_boxes = TaskDataset(get_kind("detect"), detect.samples, spec)[0][1]["boxes"]
    plain_mask = TaskDataset(get_kind("segment"), masks.samples, spec)[0][1]
    seen_flip = False
    for _ in range(20):
        image, target = TaskDataset(get_kind("detect"), detect.samples, spec, augment=True)[0]
        flipped = plain_boxes.clone()
        flipped[:, [0, 2]] = 64 - plain_boxes[:, [2, 0]]
        assert torch.allclose(target["boxes"], plain_boxes) or torch.allclose(target["boxes"], flipped)
        seen_flip |= torch.allclose(target["boxes"], flipped) and not torch.allclose(flipped, plain_boxes)
        _, mask = TaskDataset(get_kind("segment"), masks.samples, spec, augment=True)[0]
        assert torch.equal(mask, plain_mask) or torch.equal(mask, plain_mask.flip(-1))
    assert seen_flip


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_by_its_official_recipe_unless_told(kind, shapes, tiny_weights, tmp_path):
    """Weight decay, bias decay and drop_path left out come from the kind's recipe; given, they win."""
    recipe = get_kind(kind).recipe
    chosen = make_config(kind, shapes, tiny_weights, tmp_path).with_recipe(recipe)
    assert (chosen.weight_decay, chosen.decay_biases, chosen.drop_path) == (recipe.weight_decay, recipe.decay_biases, recipe.drop_path)
    told = make_config(kind, shapes, tiny_weights, tmp_path, weight_decay=0.1, decay_biases=True, drop_path=0.0).with_recipe(recipe)
    assert (told.weight_decay, told.decay_biases, told.drop_path) == (0.1, True, 0.0)
    assert get_kind("classify").recipe.decay_biases is False and get_kind("segment").recipe.weight_decay == 0.01


@pytest.mark.parametrize("decay_biases", [False, True])
def test_norm_layers_never_decay_and_biases_only_when_asked(tiny_backbone, decay_biases):
    model = MonaTaskModel(tiny_backbone, make_manifest(tiny_backbone, "recipe"))
    groups = parameter_groups(model, 0.05, decay_biases)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    exempt = {names[id(p)] for g in groups if not g["weight_decay"] for p in g["params"]}
    assert decayed | exempt == {name for name, p in model.named_parameters() if p.requires_grad} and not decayed & exempt
    mona = "backbone.layers.0.blocks.0.mona1."
    assert {mona + "norm.weight", mona + "norm.bias", "head.norm.weight", "head.norm.bias"} <= exempt
    assert {mona + "project1.weight", mona + "gamma", mona + "gammax", "head.fc.weight"} <= decayed
    assert ((mona + "project1.bias") in decayed) == decay_biases and ("head.fc.bias" in decayed) == decay_biases


def test_drop_path_reaches_the_backbone_blocks_while_training(shapes, tiny_weights, tmp_path, monkeypatch):
    """The recipe's stochastic depth rises linearly to its rate over the blocks, as timm and the official code set it."""
    loaded = []
    original = Backbone.load
    monkeypatch.setattr(Backbone, "load", classmethod(lambda cls, *a, **k: loaded.append(original(*a, **k)) or loaded[-1]))
    train(make_config("classify", shapes, tiny_weights, tmp_path, max_steps=1, drop_path=0.3), log=lambda _: None)
    blocks = [block for stage in loaded[0].model.layers for block in stage.blocks]
    assert blocks[0].drop_path1.__class__.__name__ == "Identity" and blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_mona_init_starts_from_given_adapters_and_freeze_mona_trains_only_the_head(shapes, tiny_weights, tmp_path, shared_backbone):
    """`--mona-init PACKAGE --freeze-mona`: the head learns on adapters as they come (e.g. imported from the official code)."""
    given = random_package(shared_backbone, "given", seed=5, num_labels=3)
    path = given.save(tmp_path / "given.safetensors")
    messages: list[str] = []
    config = make_config("classify", shapes, tiny_weights, tmp_path, max_steps=1, mona_init=path, freeze_mona=True)
    result = train(config, log=messages.append)
    assert any(m.startswith(f"Mona starts from {path}") for m in messages)
    assert "parameters: trainable 3,843 (head 3,843)" in next(m for m in messages if m.startswith("parameters:"))
    trained = AdapterPackage.read(result.path).tensors
    mona = [name for name in given.tensors if not name.startswith("head.")]
    assert mona and all(torch.equal(trained[name], given.tensors[name]) for name in mona)


def test_the_data_format_is_the_one_named_or_recognised(shapes, tiny_weights, tmp_path):
    with pytest.raises(ValueError, match="imagefolder"):
        train(make_config("classify", shapes, tiny_weights, tmp_path, data_format="coco"), log=lambda _: None)
    result = train(make_config("classify", shapes, tiny_weights, tmp_path, max_steps=1, data_format="imagefolder"), log=lambda _: None)
    assert AdapterPackage.read(result.path).manifest.training["config"]["data_format"] == "imagefolder"


def test_mona_init_is_refused_with_a_method_that_does_not_use_mona(shapes, tiny_weights, tmp_path):
    with pytest.raises(ValueError, match="--baseline lora does not use"):
        train(make_config("classify", shapes, tiny_weights, tmp_path, mona_init=tmp_path / "x", baseline="lora"), log=lambda _: None)


def test_resuming_a_baseline_restores_what_it_trains_beyond_the_package(shapes, tiny_weights, tmp_path):
    """A checkpoint holds LoRA's own weights too, not only the package's tensors."""
    first = make_config("classify", shapes, tiny_weights, tmp_path, epochs=1, baseline="lora", checkpoint_dir=tmp_path / "ck")
    train(first, log=lambda _: None)
    with safetensors.safe_open(tmp_path / "ck" / "last.safetensors", framework="pt") as f:
        saved = [key for key in f.keys() if key.startswith("model.backbone.") and "qkv" in key]
    assert saved
    messages: list[str] = []
    resumed = make_config(
        "classify", shapes, tiny_weights, tmp_path, epochs=2, baseline="lora", checkpoint_dir=tmp_path / "ck", resume=True
    )
    train(resumed, log=messages.append)
    assert any(m.startswith("resumed from") for m in messages)


def test_position_tables_never_decay_where_they_train(tiny_backbone):
    """BitFit, Partial-1 and FULL train Swin's relative position tables; the official configs exempt them."""
    model = MonaTaskModel(tiny_backbone, make_manifest(tiny_backbone, "tables"))
    table = model.backbone.layers[0].blocks[0].attn.relative_position_bias_table
    table.requires_grad_(True)
    exempt = [p for g in parameter_groups(model, 0.05, decay_biases=True) if not g["weight_decay"] for p in g["params"]]
    assert any(p is table for p in exempt)
