"""Mona equals the paper's reference module, and its folded form equals Mona."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monaserve.adapters import SUPPORTED_BACKBONES, Mona, MonaBank, SlotRouting, create_swin, fold_mona, mona_parameters
from monaserve.adapters.swin import block_dims

from helpers import randomize_


class ReferenceMonaOp(nn.Module):
    """`MonaOp` as printed in the paper's released code (github.com/Leiyi-Hu/mona, class `MonaOp`)."""

    def __init__(self, in_features):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=3, padding=3 // 2, groups=in_features)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=5, padding=5 // 2, groups=in_features)
        self.conv3 = nn.Conv2d(in_features, in_features, kernel_size=7, padding=7 // 2, groups=in_features)
        self.projector = nn.Conv2d(in_features, in_features, kernel_size=1)

    def forward(self, x):
        identity = x
        conv1_x = self.conv1(x)
        conv2_x = self.conv2(x)
        conv3_x = self.conv3(x)
        x = (conv1_x + conv2_x + conv3_x) / 3.0 + identity
        identity = x
        x = self.projector(x)
        return identity + x


class ReferenceMona(nn.Module):
    """`Mona` as printed in the paper's released code: tokens `(B, N, C)` plus `hw_shapes`."""

    def __init__(self, in_dim, inner_dim=64):
        super().__init__()
        self.project1 = nn.Linear(in_dim, inner_dim)
        self.nonlinear = F.gelu
        self.project2 = nn.Linear(inner_dim, in_dim)
        self.dropout = nn.Dropout(p=0.1)
        self.adapter_conv = ReferenceMonaOp(inner_dim)
        self.norm = nn.LayerNorm(in_dim)
        self.gamma = nn.Parameter(torch.ones(in_dim) * 1e-6)
        self.gammax = nn.Parameter(torch.ones(in_dim))

    def forward(self, x, hw_shapes=None):
        identity = x
        x = self.norm(x) * self.gamma + x * self.gammax
        project1 = self.project1(x)
        b, n, c = project1.shape
        h, w = hw_shapes
        project1 = project1.reshape(b, h, w, c).permute(0, 3, 1, 2)
        project1 = self.adapter_conv(project1)
        project1 = project1.permute(0, 2, 3, 1).reshape(b, n, c)
        nonlinear = self.nonlinear(project1)
        nonlinear = self.dropout(nonlinear)
        project2 = self.project2(nonlinear)
        return identity + project2


def supported_widths_and_maps() -> list[tuple[str, int, int]]:
    """(backbone, width, feature-map side) for every stage of every supported backbone."""
    cases = []
    for name in SUPPORTED_BACKBONES:
        with torch.device("meta"):
            model = create_swin(name)
        side = model.patch_embed.img_size[0] // 4
        for stage in model.layers:
            side //= 2 if not isinstance(stage.downsample, nn.Identity) else 1
            cases.append((name, stage.blocks[0].norm1.normalized_shape[0], side))
    return cases


@pytest.mark.parametrize("dim", [96, 128, 192, 384, 512, 768, 1024, 1536])
def test_parameter_count_matches_formula_and_reference(dim):
    ours = sum(p.numel() for p in Mona(dim).parameters())
    reference = sum(p.numel() for p in ReferenceMona(dim).parameters())
    assert ours == reference == mona_parameters(dim) == (2 * 64 + 5) * dim + 64 * 64 + 88 * 64


def test_initial_values_follow_the_paper():
    mona = Mona(96)
    assert torch.all(mona.gamma == 1e-6)
    assert torch.all(mona.gammax == 1.0)
    assert mona.dropout.p == 0.1
    assert mona.project1.out_features == 64
    assert [c.kernel_size for c in (mona.adapter_conv.conv1, mona.adapter_conv.conv2, mona.adapter_conv.conv3)] == [
        (3, 3),
        (5, 5),
        (7, 7),
    ]


def test_state_dict_names_match_the_reference():
    assert Mona(96).state_dict().keys() == ReferenceMona(96).state_dict().keys()


@pytest.mark.parametrize("training", [False, True])
def test_mona_equals_reference_module(training):
    reference = randomize_(ReferenceMona(96), seed=1)
    ours = Mona(96)
    ours.load_state_dict(reference.state_dict())
    ours.train(training)
    reference.train(training)
    x = torch.randn(2, 14, 10, 96)
    torch.manual_seed(0)
    expected = reference(x.reshape(2, 140, 96), hw_shapes=(14, 10)).reshape(2, 14, 10, 96)
    torch.manual_seed(0)
    actual = ours(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("backbone", "dim", "side"), supported_widths_and_maps())
def test_folded_equals_reference(backbone, dim, side):
    """fp32, random weights with non-trivial gamma, at each stage's feature-map size."""
    mona = randomize_(Mona(dim), seed=dim + side).eval()
    bank = MonaBank(dim, 64, num_slots=1)
    bank.write(0, fold_mona(mona))
    x = 3.0 * torch.randn(2, side, side, dim) + torch.randn(dim)  # per-channel offsets, as in Swin streams
    expected = mona(x)
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    assert (bank(x, SlotRouting.of([0, 0])) - expected).abs().max().item() < tolerance
    bank.dense_run_limit = 0  # the gathered per-sample path
    assert (bank(x, SlotRouting.of([0, 0])) - expected).abs().max().item() < tolerance


def test_folded_on_non_square_map():
    mona = randomize_(Mona(128), seed=3).eval()
    bank = MonaBank(128, 64, num_slots=1)
    bank.write(0, fold_mona(mona))
    x = torch.randn(3, 5, 11, 128)
    torch.testing.assert_close(bank(x, SlotRouting.of([0, 0, 0])), mona(x), rtol=1e-5, atol=1e-5)


def test_empty_slot_is_identity():
    bank = MonaBank(96, 64, num_slots=4)
    x = torch.randn(2, 7, 7, 96)
    assert torch.equal(bank(x, SlotRouting.of([0, 3])), x)


@pytest.mark.parametrize("dense_run_limit", [0, 8], ids=["per-sample", "dense-runs"])
def test_bank_routes_each_sample_to_its_own_slot(dense_run_limit):
    monas = [randomize_(Mona(192), seed=s).eval() for s in range(3)]
    bank = MonaBank(192, 64, num_slots=3, dense_run_limit=dense_run_limit)
    for slot, mona in enumerate(monas):
        bank.write(slot, fold_mona(mona))
    x = torch.randn(6, 14, 14, 192)
    slots = [2, 2, 0, 1, 1, 2]  # four runs: unsorted batches work on every path
    out = bank(x, SlotRouting.of(slots))
    for i, slot in enumerate(slots):
        torch.testing.assert_close(out[i : i + 1], monas[slot](x[i : i + 1]), rtol=1e-5, atol=1e-5)
    bank.clear(2)
    assert torch.equal(bank(x[:1], SlotRouting.of([2])), x[:1])


def test_routing_finds_runs_of_equal_slots():
    routing = SlotRouting.of(torch.tensor([3, 3, 0, 1, 1, 1, 3]))
    assert [tuple(run) for run in routing.runs] == [(3, 0, 2), (0, 2, 3), (1, 3, 6), (3, 6, 7)]
    assert len(routing) == 7 and routing.slots.dtype == torch.long
    with pytest.raises(ValueError, match="at least one sample"):
        SlotRouting.of([])


def test_bank_requires_slots():
    with pytest.raises(ValueError, match="SlotRouting"):
        MonaBank(96, 64, 2)(torch.randn(1, 7, 7, 96))


def test_folded_widths_cover_every_supported_block():
    """Guard for the parametrisation above: every block width of every backbone is exercised."""
    tested = {(name, dim) for name, dim, _ in supported_widths_and_maps()}
    for name in SUPPORTED_BACKBONES:
        with torch.device("meta"):
            model = create_swin(name)
        assert {(name, dim) for _, dim in block_dims(model)} <= tested
