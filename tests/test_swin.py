"""Mona injection into timm Swin: placement, freezing, and the parameter figures of docs/reference-figures.md."""

from __future__ import annotations

import pytest
import torch

from monaserve.adapters import (
    SUPPORTED_BACKBONES,
    BackboneError,
    Mona,
    MonaTaskModel,
    adapter_budget,
    adapter_modules,
    create_swin,
    forward_pyramid,
    inject_mona,
)
from monaserve.adapters.swin import NORMED_LAST, MonaSwinBlock, architecture, block_dims

from helpers import TINY, make_manifest, randomize_

# docs/reference-figures.md (from the official Mona code and the paper's eq. (6)):
# backbone params (timm, num_classes=0), Mona per task (code), %, eq. (6), %
FIGURES = {
    "swin_tiny_patch4_window7_224": (27_519_354, 1_408_128, "5.12", 1_384_368, "5.03"),
    "swin_small_patch4_window7_224": (48_837_258, 2_867_328, "5.87", 2_819_040, "5.77"),
    "swin_base_patch4_window7_224": (86_743_224, 3_667_456, "4.23", 3_607_136, "4.16"),
    "swin_large_patch4_window7_224": (194_995_476, 5_267_712, "2.70", 5_183_328, "2.66"),
}


def meta_swin(name: str, **kwargs):
    with torch.device("meta"):
        return create_swin(name, **kwargs)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_parameter_figures_match_the_reference(name):
    backbone, mona, mona_pct, eq6, eq6_pct = FIGURES[name]
    budget = adapter_budget(meta_swin(name))
    assert budget.backbone_parameters == backbone
    assert budget.mona_parameters == mona
    assert f"{budget.mona_percent:.2f}" == mona_pct
    assert budget.paper_eq6_parameters == eq6
    assert f"{budget.paper_eq6_percent:.2f}" == eq6_pct


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_injection_counts_equal_the_formula(name):
    model = meta_swin(name)
    budget = adapter_budget(model)
    inject_mona(model, Mona)
    adapters = adapter_modules(model)
    assert len(adapters) == budget.num_adapters == 2 * len(block_dims(model))
    assert sum(p.numel() for m in adapters.values() for p in m.parameters()) == budget.mona_parameters
    assert adapter_budget(model) == budget  # counting an injected model gives the same figures
    for path, dim in block_dims(model):
        block = model.get_submodule(path)
        assert isinstance(block, MonaSwinBlock)
        assert block.mona1.norm.normalized_shape == block.mona2.norm.normalized_shape == (dim,)


def test_identity_adapters_leave_timm_forward_unchanged():
    plain = create_swin(TINY, seed=7)
    adapted = create_swin(TINY, seed=7)
    inject_mona(adapted, Mona)
    for mona in adapter_modules(adapted).values():
        torch.nn.init.zeros_(mona.project2.weight)
        torch.nn.init.zeros_(mona.project2.bias)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = plain.forward_features(x)
        actual = forward_pyramid(adapted, x)[-1]
        also = adapted.forward_features(x)  # timm's own forward drives the injected blocks too
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(also, expected, rtol=1e-5, atol=1e-5)


def test_monas_sit_after_the_attention_and_mlp_residuals():
    model = create_swin(TINY, seed=0).eval()
    inject_mona(model, Mona)
    for mona in adapter_modules(model).values():
        randomize_(mona, seed=1)
    block = model.layers[1].blocks[1]  # a shifted-window block
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0], output)

        return hook

    for name in ("norm1", "norm2", "mona1", "mona2", "drop_path1"):
        getattr(block, name).register_forward_hook(record(name))
    block.register_forward_hook(record("block"))
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 224, 224))
    block_in, block_out = seen["block"]
    assert torch.equal(seen["norm1"][0], block_in)
    # mona1 takes x + attn(norm1(x)), i.e. right after the attention residual
    torch.testing.assert_close(seen["mona1"][0], block_in + seen["drop_path1"][1])
    # norm2 (the MLP branch) reads mona1's output, and mona2's output is the block's output
    assert torch.equal(seen["norm2"][0], seen["mona1"][1])
    assert torch.equal(seen["mona2"][1], block_out)
    assert not torch.equal(seen["mona1"][1], seen["mona1"][0])


def test_pyramid_shapes():
    model = create_swin(TINY, seed=0)
    with torch.no_grad():
        features = forward_pyramid(model, torch.randn(1, 3, 224, 224))
        assert [tuple(f.shape) for f in features] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384), (1, 7, 7, 768), (1, 7, 7, 768)]
        torch.testing.assert_close(features[NORMED_LAST], model.norm(features[3]))


def test_only_adapters_and_head_train(tiny_backbone):
    frozen_before = sum(p.numel() for p in tiny_backbone.model.parameters())
    model = MonaTaskModel(tiny_backbone, make_manifest(tiny_backbone, "pets", num_labels=37))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".mona" in n or n.startswith("head.") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad) == frozen_before
    head = 2 * 768 + 768 * 37 + 37
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 1_408_128 + head
    assert set(model.adapter_tensors()) == {n.removeprefix("backbone.") for n in trainable}


def test_task_model_trains_only_adapters(tiny_backbone):
    model = MonaTaskModel(tiny_backbone, make_manifest(tiny_backbone, "pets", num_labels=3)).train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.backbone.layers[0].blocks[0].mona1.gamma.grad is not None


def test_backbone_names():
    assert architecture("swin_base_patch4_window7_224.ms_in22k") == "swin_base_patch4_window7_224"
    with pytest.raises(BackboneError, match="unsupported backbone 'vit_base_patch16_224'"):
        architecture("vit_base_patch16_224")


def test_inject_refuses_other_models():
    with pytest.raises(TypeError, match="SwinTransformer"):
        inject_mona(torch.nn.Linear(2, 2), Mona)
    model = meta_swin(TINY)
    inject_mona(model, Mona)
    with pytest.raises(TypeError, match="holds Mona adapters already.*a Backbone of its own"):
        inject_mona(model, Mona)
