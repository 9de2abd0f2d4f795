"""Decoding in two steps: headers first (the request's pixel budget), reduced-scale JPEGs, and the large-image lane."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.server.decoding import LARGE_IMAGE_PIXELS, Decoder
from monaserve.server.errors import PayloadTooLarge
from monaserve.server.images import ImageLimits, OpenedImage, decode, open_images


def flat(width: int, height: int, fmt: str, orientation: int | None = None) -> bytes:
    pixels = np.repeat(np.repeat(np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], height, 0), 3, 2)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    options = {}
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_a_large_jpeg_is_set_to_decode_at_reduced_scale_but_keeps_its_original_size():
    (opened,) = open_images([flat(4000, 3000, "JPEG")], ImageLimits(), (224, 224))
    assert opened.stored_size == (4000, 3000) and opened.image.size == (500, 375)  # 1/8, still above 224
    decoded = decode(opened)
    assert decoded.image.size == (500, 375) and decoded.original_size == (3000, 4000)


def test_reduced_scale_never_goes_below_the_input_size_and_follows_exif_rotation():
    (opened,) = open_images([flat(1000, 600, "JPEG", orientation=6)], ImageLimits(), (224, 224))
    assert opened.image.size == (500, 300)  # 1/2: 1/4 would be below 224 on the short side
    decoded = decode(opened)
    assert decoded.image.size == (300, 500) and decoded.original_size == (1000, 600)  # turned upright


def test_the_request_pixel_budget_is_checked_on_headers_before_anything_decodes():
    images = [flat(1500, 1000, "PNG") for _ in range(3)]
    with pytest.raises(PayloadTooLarge, match="4500000 pixels together; the limit is 4000000"):
        open_images(images, ImageLimits(max_request_pixels=4_000_000), (224, 224))
    opened = open_images(images[:2], ImageLimits(max_request_pixels=4_000_000), (224, 224))
    assert all(isinstance(o, OpenedImage) and o.image.tile for o in opened)  # headers read, pixels not (tiles still to decode)


class RecordingPool(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.ran = 0

    def submit(self, fn, *args, **kwargs):
        self.ran += fn.__name__ == "_prepare"
        return super().submit(fn, *args, **kwargs)


def test_large_decodes_take_their_own_lane():
    pool, lane = RecordingPool(), RecordingPool()
    decoder = Decoder(ImageLimits(), pool, lane)
    side = int(LARGE_IMAGE_PIXELS**0.5) + 10
    images = [flat(side, side, "PNG"), flat(300, 200, "PNG"), flat(8000, 5000, "JPEG")]  # the JPEG decodes at 1/8
    prepared = asyncio.run(decoder.prepare(images, InputSpec(size=(224, 224))))
    assert [p.original_size for p in prepared] == [(side, side), (200, 300), (5000, 8000)]
    assert (lane.ran, pool.ran) == (1, 2)
    pool.shutdown()
    lane.shutdown()


def test_the_request_budget_counts_what_will_be_decoded():
    """Phone photos decode at reduced scale for a small input: three 2000x1500 JPEGs (9 M pixels as
    stored) count 3 x 500x375 against a 4 M budget, and fit."""
    opened = open_images([flat(2000, 1500, "JPEG")] * 3, ImageLimits(max_request_pixels=4_000_000), (224, 224))
    assert [o.pixels for o in opened] == [500 * 375] * 3


def test_multi_picture_jpegs_decode_at_reduced_scale_too():
    first, second = (Image.fromarray(np.full((1500, 2000, 3), v, np.uint8)) for v in (40, 200))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    (opened,) = open_images([buffer.getvalue()], ImageLimits(), (224, 224))
    assert opened.image.format == "MPO" and opened.image.size == (500, 375)
