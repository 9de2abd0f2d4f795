"""Turn what callers have (a path, bytes, a PIL image, a numpy array) into an encoded image to send."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

ImageInput = str | Path | bytes | bytearray | Any
"""A file path, encoded bytes (JPEG/PNG/WebP), a `PIL.Image.Image`, or an `(H, W[, 3|4])` uint8 numpy array."""

MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"RIFF": "image/webp"}


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """The image as file bytes and its content type; arrays and PIL images are encoded as PNG (lossless)."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        kind = next((t for magic, t in MAGIC.items() if data.startswith(magic)), "application/octet-stream")
        return data, kind
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise TypeError(f"arrays must be uint8 (H, W) or (H, W, C); got {array.dtype} {array.shape}")
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"
