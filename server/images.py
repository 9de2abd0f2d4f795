"""Image decoding with limits. The decoder is treated as untrusted code: every failure is a 4xx naming the image.

Decoding runs in two steps so a request's cost is known before any of it is paid: `open_images` reads
only the headers (format and size: the per-image limit applies to the size as stored; JPEGs much larger
than the task's input are set to decode at a reduced scale; the per-request limit applies to what will
be decoded), then `decode` decodes one image with Pillow, or `decode_jpeg_on` a JPEG on the engine's
device (`--jpeg-decode`).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, PngImagePlugin
from PIL.JpegImagePlugin import JpegImageFile
from torchvision.io import ImageReadMode, decode_jpeg

from .errors import BadRequest, Overloaded, PayloadTooLarge, UnsupportedMedia

PngImagePlugin.MAX_TEXT_MEMORY = 2**20  # Pillow's 64 MB: a 64 KiB PNG of compressed text chunks inflates for 50 ms
# torchvision 0.29 warns on every decode that TorchCodec will take its image decoders over; until then it is ours
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)

FORMATS = ("JPEG", "PNG", "WEBP")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that turn the image by 90 degrees: its upright size is its stored size transposed."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    """Per image, as stored (decompression bombs)."""
    max_request_pixels: int = 100_000_000
    """All images of one request together, as they will be decoded (a JPEG decoded at 1/8 counts 1/64)."""


@dataclass(frozen=True)
class OpenedImage:
    """An image whose header has been read, not yet decoded; `pixels` is what decoding it will produce."""

    image: Image.Image
    what: str
    stored_size: tuple[int, int]  # (width, height) before any reduced-scale decode
    data: bytes

    @property
    def pixels(self) -> int:
        return self.image.width * self.image.height


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image, and the size (height, width) of the original it stands for (larger if
    it was decoded at reduced scale): results are mapped back to the original."""

    image: Image.Image
    original_size: tuple[int, int]


def open_images(
    images: list[bytes | np.ndarray], limits: ImageLimits, target: tuple[int, int], device_jpegs: bool = False
) -> list[OpenedImage | Decoded]:
    """Read every image's header (raw pixels are already decoded) and check the request's pixel budget.

    `target` (height, width) is the task's input size: JPEGs at least twice as large decode at 1/2, 1/4
    or 1/8 scale, never below it, except (with `device_jpegs`) those a device decodes, in full.
    """
    opened = [
        _array_image(data, limits, f"image {i}")
        if isinstance(data, np.ndarray)
        else _open(data, limits, f"image {i}", target, device_jpegs)
        for i, data in enumerate(images)
    ]
    total = sum(o.pixels if isinstance(o, OpenedImage) else math.prod(o.original_size) for o in opened)
    if total > limits.max_request_pixels:
        raise PayloadTooLarge(
            f"the request's {len(images)} images hold {total} pixels together; the limit is {limits.max_request_pixels} "
            "(--max-request-pixels): send fewer or smaller images per request"
        )
    return opened


def decode(opened: OpenedImage) -> Decoded:
    """Decode to an upright RGB image (first frame, EXIF orientation applied); any failure is a 4xx."""
    what = opened.what
    try:
        opened.image.load()
    except Exception as exc:  # the decoder is untrusted code: whatever it raises is this image's fault
        raise BadRequest(f"{what} is corrupt or truncated and could not be decoded ({type(exc).__name__}: {exc})") from None
    image, width, height = opened.image, *opened.stored_size
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        upright = ImageOps.exif_transpose(image)
        if orientation in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        image = upright
    except Exception:  # a broken EXIF block should not lose the image: keep it as stored
        pass
    try:
        return Decoded(_to_rgb(image), (height, width))
    except Exception as exc:
        raise BadRequest(f"{what} could not be converted to RGB ({type(exc).__name__}: {exc})") from None


def _open(data: bytes, limits: ImageLimits, what: str, target: tuple[int, int], device_jpegs: bool) -> OpenedImage:
    if not data:
        raise BadRequest(f"{what} is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_bytes} (--max-image-bytes)")
    try:  # Pillow refuses (and warns of) bombs far above max_pixels itself; the check below is ours
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{what} is too large to decode safely: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedMedia(f"{what} is not a JPEG, PNG or WebP image") from None
    except Exception as exc:
        raise BadRequest(f"{what} has a corrupt header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} (--max-image-pixels)"
        )
    if isinstance(image, JpegImageFile) and not (device_jpegs and _plain_jpeg(image)):  # MPO (phones' multi-picture JPEGs) too
        side = max(target)  # either orientation: EXIF may turn the image after decoding
        try:
            image.draft(image.mode, (side, side))
        except Exception as exc:
            raise BadRequest(f"{what} has a corrupt JPEG header ({type(exc).__name__}: {exc})") from None
    return OpenedImage(image, what, (width, height), data)


def _array_image(pixels: np.ndarray, limits: ImageLimits, what: str) -> Decoded:
    """An RGB image from raw `(H, W, 3)` uint8 pixels (the Open Inference Protocol's UINT8 HWC input)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise BadRequest(f"{what} must be uint8 of shape (H, W, 3); got {pixels.dtype} {tuple(pixels.shape)}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise BadRequest(f"{what} is empty ({height}x{width})")
    if height * width > limits.max_pixels:
        raise PayloadTooLarge(f"{what} has {height * width} pixels; the limit is {limits.max_pixels} (--max-image-pixels)")
    return Decoded(Image.fromarray(np.ascontiguousarray(pixels), mode="RGB"), (height, width))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grey: keep the high byte rather than clipping
        grey = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


EXIF_TURNS = {
    2: lambda x: x.flip(2),
    3: lambda x: x.rot90(2, (1, 2)),
    4: lambda x: x.flip(1),
    5: lambda x: x.transpose(1, 2),
    6: lambda x: x.rot90(-1, (1, 2)),
    7: lambda x: x.transpose(1, 2).rot90(2, (1, 2)),
    8: lambda x: x.rot90(1, (1, 2)),
}
"""EXIF orientation -> the turn that makes `(3, H, W)` pixels upright (what `ImageOps.exif_transpose` does)."""
DEVICE_JPEG_MODES = ("RGB", "L")
"""JPEG colour modes the device decoder takes; CMYK and the rest decode with Pillow."""


def device_decodable(image: OpenedImage | Decoded) -> bool:
    """Whether `image` is a plain JPEG (not MPO, not CMYK) that `decode_jpeg_on` can decode."""
    return isinstance(image, OpenedImage) and _plain_jpeg(image.image)


def _plain_jpeg(image: Image.Image) -> bool:
    return image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES


def decode_jpeg_on(opened: OpenedImage, device: torch.device) -> torch.Tensor | None:
    """Decode a JPEG on `device` (nvJPEG on CUDA, libjpeg on the CPU) to upright uint8 `(3, H, W)` pixels;
    None where that decoder cannot (a variant nvJPEG lacks, a corrupt file): Pillow then decodes it, and
    judges it. A device out of memory is a 503 to retry, not the image's fault."""
    try:
        orientation = opened.image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # a broken EXIF block should not lose the image: keep it as stored
        orientation = None
    encoded = torch.frombuffer(bytearray(opened.data), dtype=torch.uint8)
    try:
        pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except torch.OutOfMemoryError:
        raise Overloaded(f"the device ran out of memory decoding {opened.what}; retry shortly", retry_after_s=1) from None
    except Exception:  # the decoder is untrusted code: whatever it raises, Pillow has the last word
        return None
    turn = EXIF_TURNS.get(orientation)
    return pixels if turn is None else turn(pixels)
