"""The shared-memory arena: images written by one process are read by another, regions are reused,
and a full arena refuses rather than grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from monaserve.server.shm_arena import ALIGNMENT, Arena


@pytest.fixture
def arena():
    arena = Arena(1 << 20)
    yield arena
    arena.close()


def image(seed: int, height: int = 32, width: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).permute(2, 0, 1)


READER = """
import json, sys
from monaserve.server.shm_arena import ArenaView, Region
name, regions = json.loads(sys.argv[1])
view = ArenaView(name)
print(json.dumps([view.image(Region(o, s, tuple(shape))).flatten().tolist() for o, s, shape in regions]))
"""


def test_images_written_here_read_the_same_in_another_process(arena):
    """The engine process is started on its own (not forked from a front end): it attaches by name alone."""
    images = [image(0), image(1).contiguous(), image(2, 17, 5)]  # channels-last, contiguous, odd sizes
    regions = [arena.put(i) for i in images]
    assert all(r.offset % ALIGNMENT == 0 for r in regions) and len({r.offset for r in regions}) == 3
    argument = json.dumps([arena.name, [[r.offset, r.size, r.shape] for r in regions]])
    done = subprocess.run([sys.executable, "-c", READER, argument], capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    assert all(values == i.flatten().tolist() for values, i in zip(read, images))
    again = subprocess.run([sys.executable, "-c", READER, argument], capture_output=True, text=True, timeout=120, env=os.environ)
    assert json.loads(again.stdout) == read  # the first reader's exit left the block alone


def test_freed_regions_merge_and_a_full_arena_refuses(arena):
    big = torch.zeros(3, 256, 256, dtype=torch.uint8)  # 192 KiB: five fit in 1 MiB
    regions = [arena.put(big) for _ in range(5)]
    assert arena.put(big) is None and arena.put(image(0)) is not None
    for region in regions[1:4]:  # free three neighbours out of order: they merge into one block
        arena.free(region)
    assert arena.put(torch.zeros(3, 512, 384, dtype=torch.uint8)) is not None  # 576 KiB needs all three
    arena.free(regions[0])
    arena.free(regions[4])
    assert arena.free_bytes == (1 << 20) - 576 * 1024 - ALIGNMENT * -(-(32 * 48 * 3) // ALIGNMENT)
