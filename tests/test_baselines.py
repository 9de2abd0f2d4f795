"""The Mona paper's baselines (adapters/baselines.py): each trains exactly what the official code trains, starts from
the plain backbone, changes only what trains, and reports instead of packaging where it changes the backbone."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from test_trainer import make_config

from monaserve.adapters import Backbone
from monaserve.adapters.baselines import LORA_ALPHA, LORA_RANK, METHODS, LoRAQKV, TrainingMethod, get_method
from monaserve.adapters.data.shapes import write_shapes
from monaserve.adapters.swin import adapter_modules
from monaserve.adapters.synthetic import make_manifest
from monaserve.adapters.task_model import MonaTaskModel
from monaserve.adapters.trainer import train
from monaserve.server.cli import build_parser

from helpers import TINY

BLOCK = r"layers\.\d+\.blocks\.\d+"
NOT_MONA = r"(?!.*\.mona[12]\.)"
OFFICIAL = {
    "mona": rf"{BLOCK}\.mona[12]\..+",
    "head-only": r"(?!)",
    "full": rf"{NOT_MONA}.+",
    "bitfit": rf"{NOT_MONA}.+\.(bias|relative_position_bias_table)",
    "norm-tuning": rf"(patch_embed\.norm|norm|layers\.\d+\.downsample\.norm|{BLOCK}\.norm[12])\.(weight|bias)",
    "partial-1": r"layers\.3\.blocks\.1\.(?!mona).+",
    "adapter": rf"{BLOCK}\.adapter[12]\.project[12]\.(weight|bias)",
    "lora": rf"{BLOCK}\.attn\.qkv\.lora_[AB]",
    "adaptformer": rf"{BLOCK}\.adaptmlp\.project[12]\.(weight|bias)",
}
"""The backbone parameters each method trains on a timm Swin, by the official code's rule, written out on their own."""

SWIN_T = {
    "mona": ("Mona", 1_408_128),
    "head-only": None,
    "full": ("backbone", 27_519_354),
    "bitfit": ("backbone", 75_546),
    "norm-tuning": ("backbone", 24_768),
    "partial-1": ("backbone", 7_091_928),
    "adapter": ("Adapter", 1_140_864),
    "lora": ("LoRA", 1_130_496),
    "adaptformer": ("AdaptFormer", 570_432),
}
"""Each method's trainable parameters on Swin-T besides the head, as the report names them (docs/training.md's table)."""

NEAR_IDENTITY = {"adapter", "adaptformer"}
"""Baselines whose modules the official initialisation leaves small but not zero; every other starts as the plain backbone."""

REPORTS = [name for name, method in METHODS.items() if not method.servable]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(METHODS))
def prepared(request, tiny_weights) -> tuple[TrainingMethod, MonaTaskModel]:
    """A Swin-T task model set up for each method, in eval mode (read-only: copy it to train it), without timm's
    stochastic depth, which may drop a block's branch for the whole batch and leave its parameters no gradient."""
    method = METHODS[request.param]
    backbone = Backbone.load(TINY, tiny_weights, drop_path_rate=0.0)
    model = MonaTaskModel(backbone, make_manifest(backbone, "baseline", num_labels=3))
    method.prepare(model)
    return method, model.eval()


@pytest.fixture(scope="module")
def plain_features(tiny_weights, images) -> list[torch.Tensor]:
    """The pretrained backbone's features, with every Mona the exact identity (the FIXED model)."""
    backbone = Backbone.load(TINY, tiny_weights)
    model = MonaTaskModel(backbone, make_manifest(backbone, "plain", num_labels=3))
    METHODS["head-only"].prepare(model)
    with torch.no_grad():
        return model.eval().features(images)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), num_images=10, size=64, seed=1)


def trainable(model: MonaTaskModel) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_the_registry_names_every_method_and_only_mona_and_fixed_serve():
    assert list(METHODS) == list(OFFICIAL)
    assert [name for name, method in METHODS.items() if method.servable] == ["mona", "head-only"]
    assert all(method.trains and "\n" not in method.trains for method in METHODS.values())
    with pytest.raises(ValueError, match="unknown training method 'lora-64'; the methods: mona, head-only, full, bitfit"):
        get_method("lora-64")


def test_each_method_trains_exactly_what_the_official_code_trains(prepared):
    method, model = prepared
    backbone = {f"backbone.{name}" for name, _ in model.backbone.named_parameters() if re.fullmatch(OFFICIAL[method.name], name)}
    head = {name for name, _ in model.named_parameters() if name.startswith("head.")}
    assert trainable(model) == backbone | head
    counts = method.trainable_counts(model)
    assert counts.pop("head") == sum(p.numel() for p in model.head.parameters())
    assert counts == dict([SWIN_T[method.name]] if SWIN_T[method.name] else [])


def test_every_baseline_starts_from_the_plain_backbone(prepared, plain_features, images):
    """Each Mona the exact identity and frozen, the method's own modules exactly or nearly the identity."""
    method, model = prepared
    monas = adapter_modules(model.backbone).values()
    assert [not mona.project2.weight.any() and not mona.project2.bias.any() for mona in monas] == [not method.trains_mona] * len(monas)
    assert all(p.requires_grad == method.trains_mona for mona in monas for p in mona.parameters())
    if method.trains_mona:
        return  # Mona's own initialisation is tests/test_mona.py's
    with torch.no_grad():
        features = model.features(images)
    for level, plain in zip(features, plain_features, strict=True):
        if method.name in NEAR_IDENTITY:  # truncated-normal projections (std 0.02): a small move, not none
            assert 0 < (level - plain).norm() / plain.norm() < 0.05
        else:
            assert torch.equal(level, plain)


def test_a_training_step_changes_only_what_trains(prepared, images):
    """Every trainable tensor gets a gradient, and only those change."""
    method, model = prepared
    model = copy.deepcopy(model).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # two: LoRA's down projection has no gradient while its up projection is zero
        optimizer.zero_grad()
        model.loss(images, torch.tensor([0, 2])).backward()
        optimizer.step()
    assert {name for name, p in model.named_parameters() if p.grad is not None and p.grad.any()} == trainable(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable(model)


def test_lora_is_the_official_merged_update_of_q_and_v():
    """`MergedLinear(r=64, enable_lora=[True, False, True])` merged: W + [B_q A_q; 0; B_v A_v] * alpha / r."""
    qkv = torch.nn.Linear(96, 288)
    LoRAQKV.convert(qkv)
    torch.nn.init.normal_(qkv.lora_B)
    (a_q, a_v), (b_q, b_v) = qkv.lora_A.chunk(2), qkv.lora_B.chunk(2)
    merged = qkv.weight + torch.cat([b_q @ a_q, torch.zeros(96, 96), b_v @ a_v]) * (LORA_ALPHA / LORA_RANK)
    x = torch.randn(5, 96)
    torch.testing.assert_close(qkv(x), torch.nn.functional.linear(x, merged, qkv.bias))
    assert (qkv.lora_A.shape, qkv.lora_B.shape) == ((128, 96), (192, 64))


@pytest.mark.parametrize("name", REPORTS)
def test_a_baseline_that_changes_the_backbone_writes_a_report(name, shapes, tiny_weights, tmp_path):
    messages: list[str] = []
    result = train(make_config("classify", shapes, tiny_weights, tmp_path, max_steps=1, baseline=name), log=messages.append)
    assert result.package is None and result.path == tmp_path / "classify.json" and not (tmp_path / "classify.safetensors").exists()
    report = json.loads(result.path.read_text())
    part, count = SWIN_T[name]
    head = report["trainable_parameters"] - count
    assert (report["method"], report["steps"], set(report["evaluation"])) == (name, 1, {"top1", "top5"})
    assert any(m.startswith(f"parameters: trainable {count + head:,} ({part} {count:,} + head {head:,}), frozen") for m in messages)
    assert any(m.startswith(f"wrote {result.path} ({name} changes the backbone") for m in messages)


def test_an_unknown_method_is_refused_with_the_list(capsys, shapes, tiny_weights, tmp_path):
    argv = ["train", "classify", "data", "--name", "x", "--baseline", "lora-64"]
    with pytest.raises(SystemExit) as exit:
        build_parser(argv).parse_args(argv)
    refusal = capsys.readouterr().err
    assert exit.value.code == 2 and "invalid choice: 'lora-64'" in refusal and all(f"'{name}'" in refusal for name in METHODS)
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(["train", "--help"])
    help = capsys.readouterr().out
    assert all(name in help for name in METHODS)
    with pytest.raises(ValueError, match="the methods: mona, head-only, full, bitfit, norm-tuning, partial-1, adapter, lora"):
        train(make_config("classify", shapes, tiny_weights, tmp_path, baseline="lora-64"), log=lambda _: None)


def test_the_docs_table_gives_each_method_its_swin_t_count():
    section = Path(__file__).resolve().parents[1].joinpath("docs", "training.md").read_text().split("## Baselines")[1].split("\n## ")[0]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([\w-]+)` \|.*\| ([\d,]+|none) \| (?:package|report) \|$", section, re.M)}
    assert rows == {name: f"{SWIN_T[name][1]:,}" if SWIN_T[name] else "none" for name in METHODS}
    for name, method in METHODS.items():
        assert re.search(rf"^\| `{name}` \|.*\| {'package' if method.servable else 'report'} \|$", section, re.M)
