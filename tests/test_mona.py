"""Mona equals the paper's reference module, and its folded form equals Mona."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monaserve.adapters import SUPPORTED_BACKBONES, Mona, MonaBank, SlotMapping, create_swin, fold_mona, mona_parameters
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


@pytest.mark.parametrize("dim", [96, 768])
def test_initialisation_follows_the_official_init_weights(dim):
    """Projections truncated-normal with std 0.02 and zero biases; LayerNorm at 1 and 0; convolutions at PyTorch's
    defaults (the official `init_weights` touches only Linear and LayerNorm)."""
    torch.manual_seed(0)
    mona = Mona(dim)
    for projection in (mona.project1, mona.project2):
        assert projection.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert projection.weight.mean().abs().item() < 0.002
        assert torch.all(projection.bias == 0)
    assert torch.all(mona.norm.weight == 1) and torch.all(mona.norm.bias == 0)
    for conv in (mona.adapter_conv.conv1, mona.adapter_conv.conv2, mona.adapter_conv.conv3, mona.adapter_conv.projector):
        bound = 1 / conv.weight[0].numel() ** 0.5  # kaiming_uniform(a=sqrt(5)) and the bias share this bound
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound


def test_an_untrained_mona_moves_its_input_by_about_two_percent():
    """The official init keeps an untrained Mona close to the identity (PyTorch's default Linear init moved its input by
    about a quarter of its size at width 96), so the frozen features a head first sees are the backbone's."""
    torch.manual_seed(0)
    x = torch.randn(8, 14, 14, 96)
    official = Mona(96).eval()
    change = ((official(x) - x).norm() / x.norm()).item()
    assert 0.01 < change < 0.04
    default = Mona(96).eval()
    for projection in (default.project1, default.project2):
        nn.Linear.reset_parameters(projection)
    assert ((default(x) - x).norm() / x.norm()).item() > 5 * change


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


def bank_of(monas: list[Mona], num_slots: int | None = None, max_batch: int = 8) -> MonaBank:
    """A bank with `monas` folded into slots 0, 1, ... (and empty slots up to `num_slots`)."""
    bank = MonaBank(monas[0].project1.in_features, 64, num_slots or len(monas), SlotMapping(max_batch))
    for slot, mona in enumerate(monas):
        bank.write(slot, fold_mona(mona))
    return bank


def routed(bank: MonaBank, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    bank.mapping.set(slots)
    return bank(x)


@pytest.mark.parametrize(("backbone", "dim", "side"), supported_widths_and_maps())
def test_folded_equals_reference(backbone, dim, side):
    """fp32, random weights with non-trivial gamma, at each stage's feature-map size."""
    mona = randomize_(Mona(dim), seed=dim + side).eval()
    x = 3.0 * torch.randn(2, side, side, dim) + torch.randn(dim)  # per-channel offsets, as in Swin streams
    expected = mona(x)
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    assert (routed(bank_of([mona]), x, [0, 0]) - expected).abs().max().item() < tolerance


def test_folded_layer_norm_holds_where_the_mean_dwarfs_the_spread():
    """The fold computes A @ LN(x) as r * (A @ x - mu * A @ 1): the subtraction cancels most of A @ x when
    |mu| is many deviations, as in Swin's outlier channels; float32 accumulation keeps it."""
    mona = randomize_(Mona(96), seed=5).eval()
    x = torch.randn(2, 7, 7, 96) + 40.0
    expected = mona(x)
    assert (routed(bank_of([mona]), x, [0, 0]) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_folded_in_bfloat16_stays_within_its_stated_tolerance():
    """bf16 weights and activations, as served on CUDA: within 2% of the largest output of the fp32 module."""
    mona = randomize_(Mona(192), seed=6).eval()
    x = 3.0 * torch.randn(3, 14, 14, 192) + torch.randn(192)
    bank = bank_of([mona]).to(torch.bfloat16)
    error = (routed(bank, x.bfloat16(), [0, 0, 0]).float() - mona(x)).abs().max().item()
    assert error < 2e-2 * mona(x).abs().max().item()


def test_folded_on_non_square_map():
    mona = randomize_(Mona(128), seed=3).eval()
    x = torch.randn(3, 5, 11, 128)
    torch.testing.assert_close(routed(bank_of([mona]), x, [0, 0, 0]), mona(x), rtol=1e-5, atol=1e-5)


def test_empty_slot_is_identity():
    bank = bank_of([randomize_(Mona(96), seed=1)], num_slots=4)
    x = torch.randn(2, 7, 7, 96)
    assert torch.equal(routed(bank, x, [3, 2]), x)


def test_bank_routes_each_sample_to_its_own_slot():
    monas = [randomize_(Mona(192), seed=s).eval() for s in range(3)]
    bank = bank_of(monas)
    x = torch.randn(6, 14, 14, 192)
    slots = [2, 2, 0, 1, 1, 2]  # unsorted: every sample reads its own slot, wherever it sits
    out = routed(bank, x, slots)
    for i, slot in enumerate(slots):
        torch.testing.assert_close(out[i : i + 1], monas[slot](x[i : i + 1]), rtol=1e-5, atol=1e-5)
    bank.clear(2)
    assert torch.equal(routed(bank, x[:1], [2]), x[:1])


def test_a_bank_reads_the_first_entries_of_its_mapping():
    """A batch of B reads slots 0..B-1 of the mapping (the engine pads every batch to a bucket)."""
    monas = [randomize_(Mona(96), seed=s).eval() for s in range(2)]
    bank = bank_of(monas)
    bank.mapping.set([1, 0, 0, 0])
    x = torch.randn(1, 7, 7, 96)
    torch.testing.assert_close(bank(x), monas[1](x), rtol=1e-5, atol=1e-5)


def test_a_mapping_routes_one_to_its_size_samples():
    mapping = SlotMapping(4)
    mapping.set(torch.tensor([3, 3, 0]))
    assert mapping.current(3).tolist() == [3, 3, 0] and mapping.sample_slots.dtype == torch.long
    for wrong in ([], [0] * 5):
        with pytest.raises(ValueError, match="this mapping routes 1 to 4"):
            mapping.set(wrong)


def test_folded_widths_cover_every_supported_block():
    """Guard for the parametrisation above: every block width of every backbone is exercised."""
    tested = {(name, dim) for name, dim, _ in supported_widths_and_maps()}
    for name in SUPPORTED_BACKBONES:
        with torch.device("meta"):
            model = create_swin(name)
        assert {(name, dim) for _, dim in block_dims(model)} <= tested
