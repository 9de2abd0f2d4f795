"""Input sizes other than 224: training and serving compute the same at every size they accept, and what timm's
window layout (which both run) computes, against the official Swin's, is pinned down block by block."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from monaserve.adapters import Backbone, MonaTaskModel
from monaserve.server.engine import Engine
from monaserve.testing.window_layout import official_attention

from helpers import TINY, random_package

SIZES = [(32, 32), (64, 64), (96, 160), (160, 96), (256, 256), (320, 224)]
"""Square and not, multiples of 32 that are and are not multiples of 7 x 32: the sizes a task may ask for."""


@pytest.fixture(scope="module")
def trained_and_served(tiny_weights, shared_backbone) -> tuple[MonaTaskModel, Engine]:
    """One task as the trainer holds it (reference Mona) and as the engine serves it (folded, batched)."""
    package = random_package(shared_backbone, "sized", seed=3)
    model = MonaTaskModel(Backbone.load(TINY, tiny_weights), package.manifest).eval()
    model.load_package(package)
    engine = Engine(Backbone.load(TINY, tiny_weights), num_slots=1)
    engine.install(0, package)
    return model, engine


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_training_and_serving_agree_at_every_size(trained_and_served, size):
    """The trainer's model and the engine give the same pyramid at any size (a task's input size is its own)."""
    model, engine = trained_and_served
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained, served = model.features(images), engine.features(images, [0, 0])
    assert [tuple(level.shape[1:3]) for level in served[:4]] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
    for expected, actual in zip(trained, served):  # folded Mona rounds differently: compare each level as a whole
        assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


def block(shift: int, stage_side: int = 56) -> SwinTransformerBlock:
    """A timm Swin-T stage-1 block (window 7) whose map at the size it was built for is `stage_side`."""
    torch.manual_seed(0)
    return SwinTransformerBlock(96, (stage_side, stage_side), num_heads=3, window_size=7, shift_size=shift, dynamic_mask=True).eval()


@pytest.mark.parametrize("side", [7, 14, 21, 56])
def test_where_maps_are_multiples_of_the_window_timm_attends_as_the_official_swin(side):
    """Rolling then padding (timm) and padding then rolling (official) agree when there is nothing to pad."""
    x = torch.randn(2, side, side, 96)
    for shift in (0, 3):
        b = block(shift)
        with torch.no_grad():
            torch.testing.assert_close(b._attn(x), official_attention(b, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [2, 4, 8, 10, 16])
def test_elsewhere_shifted_blocks_differ_from_the_official_swin(side):
    """A map that needs padding: timm's wrapped rows and the padding fall in other windows than the official ones
    (unshifted blocks still agree: both pad at the bottom and right and mask nothing)."""
    x = torch.randn(2, side, side, 96)
    unshifted, shifted = block(0), block(3)
    with torch.no_grad():
        torch.testing.assert_close(unshifted._attn(x), official_attention(unshifted, x), rtol=1e-5, atol=1e-5)
        difference = (shifted._attn(x) - official_attention(shifted, x)).norm() / x.norm()
    assert difference > 1e-3


def test_the_last_stage_is_never_shifted_by_timm_but_is_by_the_official_swin(shared_backbone):
    """timm shifts no stage whose map, at the size the model was built for (224), fits one window: the last; the
    official Swin shifts every odd block (`always_partition=True` in timm would too)."""
    last = shared_backbone.model.layers[-1].blocks
    assert [b.shift_size for b in last] == [(0, 0), (0, 0)] and [b.target_shift_size for b in last] == [(0, 0), (3, 3)]
    earlier = [b.shift_size for stage in shared_backbone.model.layers[:-1] for b in stage.blocks]
    assert earlier == [(0, 0), (3, 3)] * (len(earlier) // 2)
