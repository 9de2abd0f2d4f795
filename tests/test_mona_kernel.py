"""The fused Triton Mona (`adapters/mona_kernel.py`) against the torch bank and the reference module: on
CUDA when there is one, else on Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest)."""

from __future__ import annotations

import os

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("Triton is not installed (torch's CUDA wheels bring it)", allow_module_level=True)

from monaserve.adapters import Backbone, InputSpec, Mona, MonaBank, SlotMapping, fold_mona
from monaserve.adapters.synthetic import randomize_
from monaserve.server.engine import Engine

from helpers import TINY, random_package

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def banks(dim: int, monas: list[Mona], dtype: torch.dtype) -> tuple[MonaBank, MonaBank]:
    """The same folded adapters in a torch bank and a Triton bank (slot i holds `monas[i]`, one slot empty)."""
    pair = []
    for kernel in ("torch", "triton"):
        bank = MonaBank(dim, 64, len(monas) + 1, SlotMapping(8, DEVICE), kernel=kernel)
        for slot, mona in enumerate(monas):
            bank.write(slot, fold_mona(mona))
        pair.append(bank.to(DEVICE, dtype))
    return pair[0], pair[1]


def run(bank: MonaBank, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    bank.mapping.set(slots)
    return bank(x)


@pytest.mark.parametrize(
    ("dim", "size", "slots"),
    [
        (96, (7, 7), [0, 0]),  # one task
        (128, (5, 11), [2, 0, 1, 0]),  # odd, non-square map; a slot per sample, unsorted
        (192, (9, 13), [1, 3, 2]),  # the empty slot is the identity inside a mixed batch
        (96, (33, 3), [0]),  # more tokens than one block, a map narrower than the 7x7 filter
    ],
)
def test_kernel_equals_the_torch_bank_and_the_reference_in_float32(dim, size, slots):
    monas = [randomize_(Mona(dim), seed=dim + s).eval() for s in range(3)]
    torch_bank, triton_bank = banks(dim, monas, torch.float32)
    x = (3.0 * torch.randn(len(slots), *size, dim) + torch.randn(dim)).to(DEVICE)
    got = run(triton_bank, x, slots)
    torch.testing.assert_close(got, run(torch_bank, x, slots), rtol=1e-5, atol=1e-5)
    for i, slot in enumerate(slots):
        expected = x[i : i + 1] if slot == len(monas) else monas[slot].to(DEVICE)(x[i : i + 1])
        assert (got[i : i + 1] - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


def test_kernel_in_bfloat16_stays_within_its_stated_tolerance():
    """bf16 activations and weights: within 2% of the fp32 module's largest output (a bf16 step is 0.4%)."""
    dim, monas = 96, [randomize_(Mona(96), seed=s).eval() for s in range(2)]
    torch_bank, triton_bank = banks(dim, monas, torch.bfloat16)
    x = 3.0 * torch.randn(3, 9, 9, dim) + torch.randn(dim)
    slots = [1, 0, 1]
    got = run(triton_bank, x.to(DEVICE, torch.bfloat16), slots).float().cpu()
    for i, slot in enumerate(slots):
        expected = monas[slot](x[i : i + 1])
        assert (got[i : i + 1] - expected).abs().max() < 2e-2 * expected.abs().max()
    same_dtype = run(torch_bank, x.to(DEVICE, torch.bfloat16), slots).float().cpu()
    assert (got - same_dtype).abs().max() < 2e-2 * same_dtype.abs().max()


@pytest.mark.slow
def test_an_engine_on_the_kernel_answers_as_the_torch_engine():
    """A reduced-depth Swin-T engine (one block per stage: every width) with `mona_kernel="triton"`, a mixed
    batch of two tasks at 64x64, against the torch engine."""
    engines = {}
    for kernel in ("torch", "triton"):
        backbone = Backbone.load(TINY, "random", depths=(1, 1, 1, 1))
        engines[kernel] = Engine(backbone, num_slots=2, device=DEVICE, dtype=torch.float32, mona_kernel=kernel)
        for slot in range(2):
            engines[kernel].install(slot, random_package(backbone, f"task-{slot}", seed=slot, input=InputSpec(size=(64, 64))))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for got, want in zip(engines["triton"].run(images, [1, 0, 1]), engines["torch"].run(images, [1, 0, 1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton op inside a compiled graph needs a GPU")
def test_the_kernel_compiles_into_the_engines_graph():
    """`compile` with `mona_kernel="triton"`: the kernels inside the CUDA-graphed forward, a mixed batch equal
    to the eager torch engine in bf16."""
    engines = {}
    for kernel, compiled in (("torch", False), ("triton", True)):
        backbone = Backbone.load(TINY, "random", depths=(1, 1, 1, 1))
        engine = Engine(backbone, num_slots=2, device=DEVICE, max_batch=4, compile=compiled, mona_kernel=kernel)
        for slot in range(2):
            engine.install(slot, random_package(backbone, f"task-{slot}", seed=slot, input=InputSpec(size=(64, 64))))
        engines[kernel] = engine
    engines["triton"].prepare((64, 64))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for got, want in zip(engines["triton"].run(images, [1, 0, 1]), engines["torch"].run(images, [1, 0, 1]), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
