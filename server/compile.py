"""Compiling the engine's batched forward: the batch buckets it sees, and torch.compile set up for them."""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch

GRAPHS_PER_BUCKET = 4
"""Input sizes each bucket may compile for before torch.compile stops compiling (falls back to eager)."""


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a batch is padded to: powers of two below `max_batch`, then `max_batch` itself."""
    if max_batch < 1:
        raise ValueError("the largest batch must hold at least one image")
    return (*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch)


def bucket_of(count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `count` images."""
    return buckets[bisect.bisect_left(buckets, count)]


def use_compile_cache(folder: Path) -> None:
    """Keep Inductor's compiled graphs and kernels in `folder`, so that a restart loads them instead of compiling."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())


def compile_forward(forward: Callable, device: torch.device, buckets: int) -> Callable:
    """`forward` compiled as one graph per input shape (`fullgraph`, no dynamic shapes), replayed as a CUDA
    graph on CUDA (`reduce-overhead`); each call marks a new CUDA-graph step, as the engine runs one
    batch at a time and is done with the last batch's outputs."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_BUCKET * buckets)
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(forward, fullgraph=True, dynamic=False, mode=mode)
    if device.type != "cuda":
        return compiled

    @functools.wraps(forward)
    def step(*args: torch.Tensor) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step
