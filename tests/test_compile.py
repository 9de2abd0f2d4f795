"""The compiled engine: one graph per bucket that holds for every task mix, equal to the eager engine."""

from __future__ import annotations

import pytest
import torch

from monaserve.adapters import Backbone, InputSpec
from monaserve.server.compile import batch_buckets, bucket_of, use_compile_cache
from monaserve.server.engine import Engine

from helpers import TINY, random_package

SIZE = (64, 64)
DEPTHS = (1, 1, 1, 1)  # every stage, its downsampling and a Mona bank at each width; one block each
TASKS = 3


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))]
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-2}  # CUDA runs bf16, where Inductor's fused kernels round differently


def engine_with_tasks(compile: bool, device: str, max_batch: int = 2) -> Engine:
    """A reduced-depth Swin-T engine with TASKS random tasks of 64x64 inputs (same weights every call)."""
    backbone = Backbone.load(TINY, "random", depths=DEPTHS)
    engine = Engine(backbone, num_slots=TASKS + 1, device=device, max_batch=max_batch, compile=compile)
    for slot in range(TASKS):
        engine.install(slot, random_package(backbone, f"task-{slot}", seed=slot, num_labels=3 + slot, input=InputSpec(size=SIZE)))
    return engine


@pytest.fixture(scope="module", params=DEVICES)
def engines(request, compile_cache):
    """A compiled engine, warmed by `prepare`, and an eager one with the same weights, on each device."""
    torch._dynamo.reset()
    use_compile_cache(compile_cache)
    compiled, eager = engine_with_tasks(True, request.param), engine_with_tasks(False, request.param)
    compiled.prepare(SIZE)
    return compiled, eager, TOLERANCE[request.param]


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert [bucket_of(n, batch_buckets(12)) for n in (1, 3, 4, 5, 9, 12)] == [1, 4, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="at least one image"):
        batch_buckets(0)


@pytest.mark.slow
def test_twenty_task_mixes_at_one_bucket_compile_nothing_new_and_equal_eager(engines):
    """`fullgraph` compile, warmed by `prepare`; then 20 random mixes of tasks (and sizes within the bucket,
    padded to it; half of them channels-last) run without one recompile, each output equal to the eager engine's."""
    compiled, eager, tolerance = engines
    assert compiled.compiled and compiled.buckets == (1, 2)
    warm = graphs_compiled()
    assert warm >= len(compiled.buckets)
    generator = torch.Generator().manual_seed(0)
    for mix in range(20):
        count = 2 if mix % 4 else 1  # one mix in four is padded from 1 to the bucket
        slots = torch.randint(0, TASKS, (count,), generator=generator)
        images = torch.randint(0, 256, (count, 3, *SIZE), dtype=torch.uint8, generator=generator)
        if mix % 2:  # as the server's decoders make them: HWC pixels seen as CHW
            images = images.contiguous(memory_format=torch.channels_last)
        for got, want in zip(compiled.run(images, slots), eager.run(images, slots), strict=True):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance / 10)
    assert graphs_compiled() == warm, "a task mix made the compiled engine compile again"


@pytest.mark.slow
def test_the_compiled_pyramid_equals_eager_level_by_level(engines):
    compiled, eager, tolerance = engines
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    slots = [0, 2]
    for got, want in zip(compiled.features(images, slots), eager.features(images, slots), strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
