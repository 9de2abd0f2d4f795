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
import math
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import torch

from monaserve.adapters.manifest import InputSpec
from monaserve.adapters.transforms import Prepared, prepare_pixels, preprocess

from .images import Decoded, ImageLimits, OpenedImage, decode, decode_jpeg_on, device_decodable, open_images

log = logging.getLogger(__name__)
LARGE_IMAGE_PIXELS = 4_000_000
"""Images decoding to more pixels than this (after any reduced-scale JPEG decode) use the large lane."""
SMALL_BODY_BYTES = 8 * 2**10
"""An image this small has its header read on the event loop: that costs less than the trip to a pool
thread and back, and stays under 2 ms even for a header packed with markers or text chunks."""
SMALL_IMAGE_PIXELS = 128 * 128
"""A request of one small-bodied image decoding to no more pixels than this is prepared on the event
loop too (a 32-px PNG: 1.47x the requests/s, 2 cores)."""
LARGE_LANE_NICENESS = 10
"""How much lower the large lane's CPU priority is (Linux nice; threads have their own)."""


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: the lane still serialises
        log.info("large-image lane keeps normal priority: %s", exc)


def _small_body(image: bytes | np.ndarray) -> bool:
    return (len(image) if isinstance(image, bytes) else image.nbytes) <= SMALL_BODY_BYTES


def jpeg_device(choice: str, engine_device: torch.device) -> torch.device | None:
    """Where JPEGs decode for `--jpeg-decode choice`: the engine's device, or None for Pillow on the CPU."""
    if choice == "device" or (choice == "auto" and engine_device.type == "cuda"):
        return engine_device
    return None


def large_image_lane() -> ThreadPoolExecutor:
    """One low-priority thread for large decodes."""
    return ThreadPoolExecutor(1, thread_name_prefix="decode-large", initializer=_lower_priority)


class Decoder:
    """Turns a request's encoded images (or raw pixels) into model inputs for one task's input spec.

    With a `jpeg_device`, plain JPEGs decode there in full (nvJPEG on CUDA) and are resized there; the
    other images, and every image without one, decode with Pillow on the CPU (JPEGs at reduced scale).
    """

    def __init__(self, limits: ImageLimits, pool: Executor, large_lane: Executor, jpeg_device: torch.device | None = None) -> None:
        self.limits = limits
        self.pool = pool
        self.large_lane = large_lane
        self.jpeg_device = jpeg_device

    async def prepare(self, images: list[bytes | np.ndarray], spec: InputSpec) -> list[Prepared]:
        """Headers first (the request's pixel budget is checked before anything is decoded), then every
        image on its lane, in parallel. A request of one image takes one trip to the pool, or none if the
        image is small."""
        loop = asyncio.get_running_loop()
        if len(images) == 1 and _small_body(images[0]):  # a small body holds little header to parse: read it here
            opened = self._open(images, spec)
            if self._is_small(opened[0]):
                return [self._prepare(opened[0], spec)]
        else:
            opened = await loop.run_in_executor(self.pool, self._open_and_prepare_one, images, spec)
            if len(opened) == 1 and isinstance(opened[0], Prepared):
                return opened
        futures = [loop.run_in_executor(self.large_lane if self._is_large(o) else self.pool, self._prepare, o, spec) for o in opened]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:  # one image failed, or the request gave up: the others need not start
            for future in futures:
                future.cancel()
            raise

    def _open(self, images: list[bytes | np.ndarray], spec: InputSpec) -> list[OpenedImage | Decoded]:
        return open_images(images, self.limits, spec.size, device_jpegs=self.jpeg_device is not None)

    def _open_and_prepare_one(self, images: list[bytes | np.ndarray], spec: InputSpec) -> list[OpenedImage | Decoded] | list[Prepared]:
        """In a pool thread: every image's header, and a lone image that is not large prepared in the same trip."""
        opened = self._open(images, spec)
        if len(opened) == 1 and not self._is_large(opened[0]):
            return [self._prepare(opened[0], spec)]
        return opened

    def _prepare(self, image: OpenedImage | Decoded, spec: InputSpec) -> Prepared:
        if self._on_device(image) and (pixels := decode_jpeg_on(image, self.jpeg_device)) is not None:
            return prepare_pixels(pixels, spec)
        decoded = decode(image) if isinstance(image, OpenedImage) else image
        return preprocess(decoded.image, spec, original_size=decoded.original_size)

    def _on_device(self, image: OpenedImage | Decoded) -> bool:
        return self.jpeg_device is not None and device_decodable(image)

    def _is_small(self, image: OpenedImage | Decoded) -> bool:
        """Cheaper to prepare than a trip to the pool (a device decode never is: it waits on the GPU)."""
        pixels = image.pixels if isinstance(image, OpenedImage) else math.prod(image.original_size)
        return pixels <= SMALL_IMAGE_PIXELS and not self._on_device(image)

    def _is_large(self, image: OpenedImage | Decoded) -> bool:
        """Large for either decoder: Pillow's CPU time, or a full decode's device memory."""
        return isinstance(image, OpenedImage) and image.pixels > LARGE_IMAGE_PIXELS
