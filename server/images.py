"""Image decoding with limits: every failure is a 4xx that says what was wrong."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import BadRequest, PayloadTooLarge, UnsupportedMedia

FORMATS = ("JPEG", "PNG", "WEBP")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grey: keep the high byte rather than clipping
        grey = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to an upright RGB image (first frame, EXIF orientation applied).

    Every failure is a `ServeError` with a 4xx status and says what was wrong with `what`.
    """
    if not data:
        raise BadRequest(f"{what} is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(
                    f"{what} is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{what} is too large to decode safely: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedMedia(f"{what} is not a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(f"{what} is corrupt or truncated: {exc}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose the image: keep it as stored
        pass
    return _to_rgb(image)


def array_image(pixels: np.ndarray, limits: ImageLimits, what: str = "image") -> Image.Image:
    """An RGB image from raw `(H, W, 3)` uint8 pixels (the Open Inference Protocol's UINT8 HWC input)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise BadRequest(f"{what} must be uint8 of shape (H, W, 3); got {pixels.dtype} {tuple(pixels.shape)}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise BadRequest(f"{what} is empty ({height}x{width})")
    if height * width > limits.max_pixels:
        raise PayloadTooLarge(f"{what} has {height * width} pixels; the limit is {limits.max_pixels}")
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
