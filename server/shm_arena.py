"""A bounded block of shared memory that one front-end process writes prepared images into for the
engine process to read: the images cross without being copied through a socket.

The front end owns the block and is its only allocator (`Arena`); the engine attaches to it by name
(`ArenaView`) and reads the regions a message names. A region is freed when the engine's answer for
it arrives. A full arena refuses the allocation (the caller answers 503), so a burst cannot grow it.
"""

from __future__ import annotations

import bisect
import os
import sys
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import torch

ALIGNMENT = 64
"""Regions start on cache-line boundaries."""
_OWNED: set[str] = set()
"""Names of the blocks this process created (and will unlink)."""


class ArenaUnavailable(RuntimeError):
    """The shared-memory arena could not be made as large as asked."""


@dataclass(frozen=True)
class Region:
    """Bytes `[offset, offset + size)` of an arena, holding one uint8 `(H, W, 3)` image."""

    offset: int
    size: int
    shape: tuple[int, int, int]


class Arena:
    """The front end's side: allocate a region, write an image into it, free it; first fit, neighbours merged."""

    def __init__(self, size: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=size)
        _OWNED.add(self.shm.name)
        try:  # reserve the pages now: a full /dev/shm must refuse here, not kill the process (SIGBUS) on a write
            os.posix_fallocate(self.shm._fd, 0, size)
        except OSError as exc:
            self.close()
            raise ArenaUnavailable(
                f"cannot reserve a {size >> 20} MiB shared-memory arena ({exc.strerror}): give /dev/shm more room "
                "(docker run --shm-size, an emptyDir with medium Memory in Kubernetes) or lower --arena-mb"
            ) from None
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset, never adjacent

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def put(self, image: torch.Tensor) -> Region | None:
        """Copy uint8 `(3, H, W)` `image` (any layout) into a new region as `(H, W, 3)`; None if none is free."""
        pixels = image.permute(1, 2, 0)
        nbytes = pixels.numel()
        need = -(-nbytes // ALIGNMENT) * ALIGNMENT
        for index, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[index]
                else:
                    self._free[index] = (offset + need, size - need)
                break
        else:
            return None
        target = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=nbytes, offset=offset).view(pixels.shape)
        target.copy_(pixels)
        return Region(offset, need, tuple(pixels.shape))

    def free(self, region: Region) -> None:
        """Give `region` back, merged with free neighbours."""
        index = bisect.bisect(self._free, (region.offset, 0))
        start, size = region.offset, region.size
        if index < len(self._free) and self._free[index][0] == start + size:  # the next free block
            size += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == start:  # the previous one
            start, previous = self._free[index - 1]
            size += previous
            del self._free[index - 1]
            index -= 1
        self._free.insert(index, (start, size))

    def close(self) -> None:
        """Release the block (the owner unlinks it: no name is left behind in /dev/shm)."""
        self.shm.close()
        self.shm.unlink()
        _OWNED.discard(self.shm.name)


class ArenaView:
    """The engine's side: a front end's arena, attached by name, read as images."""

    def __init__(self, name: str) -> None:
        self.shm = _attach(name)

    def image(self, region: Region) -> torch.Tensor:
        """The uint8 `(3, H, W)` image in `region`: a view of the shared bytes (valid until the region is freed)."""
        nbytes = region.shape[0] * region.shape[1] * region.shape[2]
        return torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=nbytes, offset=region.offset).view(region.shape).permute(2, 0, 1)

    def close(self) -> None:
        self.shm.close()


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to a block another process owns, without adopting it (Python < 3.13 would unlink it at our exit)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    shm = shared_memory.SharedMemory(name=name)
    if name not in _OWNED:  # our own block (an engine in this process, in tests) stays ours to unlink
        resource_tracker.unregister(shm._name, "shared_memory")
    return shm
