"""Decoding in two steps: headers first (the request's pixel budget), reduced-scale JPEGs, the large-image lane, and
JPEGs decoded on the engine's device giving Pillow's tensor."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.server.decoding import LARGE_IMAGE_PIXELS, Decoder
from monaserve.server.errors import BadRequest, PayloadTooLarge
from monaserve.server.images import ImageLimits, OpenedImage, decode, device_decodable, open_images


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
    """Counts the images prepared in it (`ran`) and every trip to it (`trips`)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.ran = self.trips = 0

    def submit(self, fn, *args, **kwargs):
        self.ran += fn.__name__ == "_prepare"
        self.trips += 1
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


def test_one_small_image_is_prepared_without_the_pool_and_one_larger_in_one_trip():
    """The trip to a pool thread and back costs more than preparing a thumbnail: a request of one small
    image is prepared on the event loop; one larger image (its header read and its pixels prepared)
    takes one trip; several images take a trip each after the headers'."""
    pool, lane = RecordingPool(), RecordingPool()
    decoder, spec = Decoder(ImageLimits(), pool, lane), InputSpec(size=(224, 224))
    assert asyncio.run(decoder.prepare([flat(32, 32, "PNG")], spec))[0].tensor.shape == (3, 224, 224)
    assert pool.trips == 0
    noisy = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)  # > 64 KiB as a PNG
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    for data, trips in ((flat(512, 512, "JPEG"), 1), (buffer.getvalue(), 2), ([flat(32, 32, "PNG")] * 2, 5)):
        asyncio.run(decoder.prepare(data if isinstance(data, list) else [data], spec))
        assert pool.trips == trips, data if isinstance(data, list) else len(data)
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


def photo_jpeg(width: int, height: int, orientation: int | None = None, mode: str = "RGB") -> bytes:
    """A JPEG with gradients and stripes (edges where decoders and filters could differ)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 9 + y // 13) % 2) * 200], -1).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    options = {"quality": 95}
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def prepare_both_ways(data: bytes, spec: InputSpec, device: str):
    """The same image prepared by Pillow on the CPU, and by the device path (decode_jpeg on `device`, resize there)."""
    pool, lane = ThreadPoolExecutor(2), ThreadPoolExecutor(1)
    try:
        (pillow,) = asyncio.run(Decoder(ImageLimits(), pool, lane).prepare([data], spec))
        (on_device,) = asyncio.run(Decoder(ImageLimits(), pool, lane, torch.device(device)).prepare([data], spec))
    finally:
        pool.shutdown()
        lane.shutdown()
    return pillow, on_device


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", [None, 2, 3, 4, 5, 6, 7, 8])
def test_the_device_jpeg_path_gives_pillows_tensor_within_rounding(orientation, device):
    """Below twice the input size both paths decode in full: the pixels agree to resize rounding, the
    geometry exactly, whatever the EXIF orientation."""
    spec = InputSpec(size=(224, 224), resize="letterbox")
    pillow, on_device = prepare_both_ways(photo_jpeg(400, 300, orientation), spec, device)
    assert on_device.tensor.device.type == device
    assert (on_device.original_size, on_device.scale, on_device.offset) == (pillow.original_size, pillow.scale, pillow.offset)
    difference = (on_device.tensor.cpu().int() - pillow.tensor.int()).abs()
    assert difference.max() <= 3 and difference.float().mean() < 0.1, (difference.max(), difference.float().mean())


@pytest.mark.parametrize("device", DEVICES)
def test_a_large_jpeg_decoded_in_full_on_the_device_is_close_to_pillows_reduced_scale_decode(device):
    """Pillow decodes a 2400x1800 JPEG at 1/8 scale (its DCT does the first downscale); the device
    decodes it in full and resizes with antialiasing: the same picture, to within a few levels."""
    pillow, on_device = prepare_both_ways(photo_jpeg(2400, 1800), InputSpec(size=(224, 224)), device)
    assert on_device.original_size == pillow.original_size == (1800, 2400)
    difference = (on_device.tensor.cpu().int() - pillow.tensor.int()).abs().float()
    assert difference.mean() < 3, difference.mean()


def test_jpegs_the_device_decoder_does_not_take_decode_with_pillow():
    """CMYK JPEGs, PNGs and raw pixels take the Pillow path even with a device decoder."""
    spec = InputSpec(size=(64, 64))
    for data in (photo_jpeg(200, 100, mode="CMYK"), flat(200, 100, "PNG"), np.zeros((100, 200, 3), np.uint8)):
        (opened,) = open_images([data], ImageLimits(), spec.size, device_jpegs=True)
        assert not device_decodable(opened)
    pillow, on_device = prepare_both_ways(photo_jpeg(200, 100, mode="CMYK"), spec, "cpu")
    assert torch.equal(pillow.tensor, on_device.tensor)


def test_jpegs_pillow_decodes_keep_their_reduced_scale_beside_a_device_decoder():
    """With a device decoder, plain JPEGs are opened to decode in full (the request budget counts them so),
    and JPEGs it does not take (CMYK here) still decode at reduced scale."""
    plain, cmyk = photo_jpeg(2400, 1800), photo_jpeg(2400, 1800, mode="CMYK")
    opened = open_images([plain, cmyk], ImageLimits(), (224, 224), device_jpegs=True)
    assert [o.image.size for o in opened] == [(2400, 1800), (300, 225)]


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_pillow_and_a_full_device_is_a_503(monkeypatch):
    from monaserve.server import images
    from monaserve.server.errors import Overloaded

    data, spec = photo_jpeg(400, 300), InputSpec(size=(224, 224))

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported JPEG variant")

    monkeypatch.setattr(images, "decode_jpeg", refuse)
    pillow, on_device = prepare_both_ways(data, spec, "cpu")
    assert torch.equal(pillow.tensor, on_device.tensor)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(images, "decode_jpeg", out_of_memory)
    with pytest.raises(Overloaded, match="out of memory decoding image 0; retry"):
        prepare_both_ways(data, spec, "cpu")


def test_a_corrupt_jpeg_on_the_device_path_is_a_400_naming_the_image():
    data = photo_jpeg(400, 300)
    truncated = data[: len(data) // 2]
    pool, lane = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    decoder = Decoder(ImageLimits(), pool, lane, torch.device("cpu"))
    with pytest.raises(BadRequest, match="image 0 is corrupt or truncated"):
        asyncio.run(decoder.prepare([truncated], InputSpec(size=(64, 64))))
    pool.shutdown()
    lane.shutdown()
