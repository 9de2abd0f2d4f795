"""Detect and segment heads: they learn, predict in input pixels, package, and run in mixed batches."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from monaserve.adapters import Backbone, DetectHead, Manifest, MonaTaskModel, SegmentHead, forward_pyramid
from monaserve.adapters.heads.base import stage_inputs
from monaserve.adapters.kinds import get_kind
from monaserve.server.engine import Engine

from helpers import TINY, make_manifest, random_package

STAGES = [96, 192, 384, 768]


def pyramid(batch: int = 2, size: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """Levels as `forward_pyramid` gives them: four stages, then the last through a (here random) final norm."""
    generator = torch.Generator().manual_seed(seed)
    stages = [torch.randn(batch, size // s, size // s, d, generator=generator) * (1 + s) for s, d in zip((4, 8, 16, 32), STAGES)]
    final_norm = torch.nn.LayerNorm(STAGES[-1])
    torch.nn.init.normal_(final_norm.weight, 1.0, 0.3, generator=generator)
    torch.nn.init.normal_(final_norm.bias, 0.0, 0.3, generator=generator)
    with torch.no_grad():
        return [*stages, final_norm(stages[-1])]


def fit(head: torch.nn.Module, features, target, steps: int, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = head.loss(features, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_detect_head_learns_and_predicts_in_input_pixels():
    torch.manual_seed(0)
    head = DetectHead(STAGES, num_classes=3, score_threshold=0.05)
    features = pyramid(size=96)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = fit(head, features, targets, steps=80, lr=2e-3)
    assert losses[-1] < 0.2 * losses[0]
    head.eval()
    first, second = head.predict(features)
    assert first["boxes"].shape[1] == 4 and len(first["boxes"]) == len(first["scores"]) == len(first["labels"])
    best = first["scores"].argmax()
    assert first["labels"][best] == 2
    assert torch.all(first["boxes"] >= 0) and torch.all(first["boxes"] <= 96)
    assert box_iou(first["boxes"][best : best + 1], targets[0]["boxes"]).item() > 0.5
    assert len(second["scores"]) == 0 or second["scores"].max() < first["scores"].max()


def test_segment_head_learns_and_predicts_at_input_size():
    torch.manual_seed(0)
    head = SegmentHead(STAGES, num_classes=4, channels=64)
    features = pyramid()
    masks = torch.zeros(2, 128, 128, dtype=torch.int64)
    masks[0, 20:70, 30:90] = 2
    masks[1, 64:, :] = 3
    masks[1, :8, :8] = 255  # ignored
    losses = fit(head, features, masks, steps=40)
    assert losses[-1] < 0.5 * losses[0]
    head.eval()
    predicted = head.predict(features)
    assert [tuple(p.shape) for p in predicted] == [(128, 128), (128, 128)]
    agreement = (torch.stack(predicted) == masks)[masks != 255].float().mean()
    assert agreement > 0.9


def test_without_stage_norm_heads_read_the_stages_as_packages_before_them_did():
    """Raw stages, the last through the backbone's final norm: what dense heads read before per-stage norms."""
    levels = pyramid()
    assert all(a is b for a, b in zip(stage_inputs(levels, (1, 2, 3), stage_norm=False), [levels[1], levels[2], levels[4]]))
    assert stage_inputs(levels, range(4), stage_norm=False)[:3] == levels[:3]


def test_stage_norm_is_the_official_frozen_per_stage_layer_norm():
    """Each stage through a LayerNorm of its own at weight 1 and bias 0: the official backbones' `norm{i}`, which
    no ImageNet checkpoint holds and Mona tuning never trains."""
    levels = pyramid()
    for level, normed in zip(levels, stage_inputs(levels, range(4), stage_norm=True)):
        torch.testing.assert_close(normed, torch.nn.LayerNorm(level.shape[-1])(level))
    assert not any(name.startswith("norm") for name, _ in DetectHead(STAGES, 3, stage_norm=True).named_parameters())


@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_packages_from_before_stage_norms_load_without_them_and_new_ones_get_them(shared_backbone, kind):
    manifest = make_manifest(shared_backbone, "x", kind=kind)
    dumped = manifest.model_dump(mode="json")
    del dumped["head"]["stage_norm"]  # a manifest written before the field existed
    assert Manifest.model_validate(dumped).head.stage_norm is False
    assert get_kind(kind).default_head(64).stage_norm is True


@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_manifest_picks_the_kinds_head(shared_backbone, kind):
    manifest = make_manifest(shared_backbone, "x", kind=kind)
    assert manifest.head.type == {"detect": "retinanet", "segment": "upernet"}[kind]
    with pytest.raises(ValueError, match=f"a {kind} task needs"):
        Manifest.model_validate({**manifest.model_dump(), "head": {"type": "linear"}})


def test_packages_of_every_kind_round_trip_into_the_reference_model(tiny_backbone, shared_backbone):
    package = random_package(shared_backbone, "seg", seed=4, kind="segment")
    assert any("running_var" in name for name in package.tensors)
    assert not any("num_batches_tracked" in name for name in package.tensors)
    model = MonaTaskModel(tiny_backbone, package.manifest)
    model.load_package(package)
    exported = model.to_package().tensors
    assert exported.keys() == package.tensors.keys()
    assert all(torch.equal(exported[k], package.tensors[k]) for k in exported)


@pytest.mark.parametrize("stage_norm", [False, True])
def test_mixed_batch_of_three_kinds_equals_each_task_alone(tiny_weights, shared_backbone, stage_norm):
    """With or without per-stage norms (packages trained before them, and after)."""
    heads = {
        kind: get_kind(kind).default_head(256) if stage_norm else get_kind(kind).head_config() for kind in ("classify", "detect", "segment")
    }
    packages = {
        kind: random_package(shared_backbone, kind, seed=i, num_labels=3, kind=kind, head=head)
        for i, (kind, head) in enumerate(heads.items())
    }
    engine = Engine(Backbone.load(TINY, tiny_weights), num_slots=3)
    for slot, package in enumerate(packages.values()):
        engine.install(slot, package)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    mixed = engine.run(images, [0, 1, 2])
    alone = [engine.run(images[i : i + 1], [i])[0] for i in range(3)]
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-4, atol=1e-4)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(mixed[1][key], alone[1][key], rtol=1e-4, atol=1e-3)
    assert len(mixed[1]["boxes"]) > 0
    assert mixed[2].shape == (224, 224) and mixed[2].dtype == torch.int32
    assert (mixed[2] == alone[2]).float().mean() > 0.999
    reference = MonaTaskModel(Backbone.load(TINY, tiny_weights), packages["segment"].manifest).eval()
    reference.load_package(packages["segment"])
    with torch.no_grad():
        expected = reference.head.predict(forward_pyramid(reference.backbone, images[2:3]))[0]
    assert (mixed[2] == expected).float().mean() > 0.999
