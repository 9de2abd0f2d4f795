"""Decoding and preparing a request's images off the event loop, with large images in a lane of their own.

A 40-megapixel PNG takes seconds of CPU to decode. On the shared pool a few of them would hold every
thread while small requests wait behind them; here images that decode to more than
`LARGE_IMAGE_PIXELS` go to one thread of their own, at a lower CPU priority, so they queue behind each
other and yield the CPU to everything else. The lane has no queue bound of its own: its requests wait
(a client that keeps sending large images is slowed by its own queue, not answered at once and free to
send more), and work still queued when its request gives up (timeout, client gone) is cancelled before
it starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from monaserve.adapters.manifest import InputSpec
from monaserve.adapters.transforms import Prepared, preprocess

from .images import Decoded, ImageLimits, OpenedImage, decode, open_images

log = logging.getLogger(__name__)
LARGE_IMAGE_PIXELS = 4_000_000
"""Images decoding to more pixels than this (after any reduced-scale JPEG decode) use the large lane."""
LARGE_LANE_NICENESS = 10
"""How much lower the large lane's CPU priority is (Linux nice; threads have their own)."""


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: the lane still serialises
        log.info("large-image lane keeps normal priority: %s", exc)


def large_image_lane() -> ThreadPoolExecutor:
    """One low-priority thread for large decodes."""
    return ThreadPoolExecutor(1, thread_name_prefix="decode-large", initializer=_lower_priority)


class Decoder:
    """Turns a request's encoded images (or raw pixels) into model inputs for one task's input spec."""

    def __init__(self, limits: ImageLimits, pool: Executor, large_lane: Executor) -> None:
        self.limits = limits
        self.pool = pool
        self.large_lane = large_lane

    async def prepare(self, images: list[bytes | np.ndarray], spec: InputSpec) -> list[Prepared]:
        """Headers first (the request's pixel budget is checked before anything is decoded), then every
        image on its lane, in parallel."""
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(self.pool, open_images, images, self.limits, spec.size)
        futures = [loop.run_in_executor(self.large_lane if _is_large(o) else self.pool, _prepare, o, spec) for o in opened]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:  # one image failed, or the request gave up: the others need not start
            for future in futures:
                future.cancel()
            raise


def _is_large(image: OpenedImage | Decoded) -> bool:
    return isinstance(image, OpenedImage) and image.pixels > LARGE_IMAGE_PIXELS


def _prepare(image: OpenedImage | Decoded, spec: InputSpec) -> Prepared:
    decoded = decode(image) if isinstance(image, OpenedImage) else image
    return preprocess(decoded.image, spec, original_size=decoded.original_size)
