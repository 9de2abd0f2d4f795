"""Property tests of the parts that read what clients send: whatever arrives, the only failure is a 4xx.

The image decoder is third-party C and Python code; a PNG chunk it mishandles (an empty iCCP after
IDAT raised IndexError) must still be the client's 400, not a 500. The Open Inference Protocol's JSON
is free-form; any shape of it must be a 400 naming the problem.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from monaserve.adapters.kinds import KINDS
from monaserve.server.dataplane import check_image_count
from monaserve.server.errors import ServeError
from monaserve.server.images import ImageLimits, decode, open_images
from monaserve.server.oip_answer import OipAnswer, parse_request

LIMITS = ImageLimits(max_bytes=2**20, max_pixels=4_000_000, max_request_pixels=8_000_000)
PNG_CHUNKS = [
    b"iCCP",
    b"zTXt",
    b"iTXt",
    b"tEXt",
    b"pHYs",
    b"gAMA",
    b"sRGB",
    b"cHRM",
    b"sBIT",
    b"tRNS",
    b"bKGD",
    b"eXIf",
    b"acTL",
    b"fcTL",
    b"PLTE",
]


def encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (24, 16)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = {
    "PNG": encoded("PNG"),
    "PNG-RGBA": encoded("PNG", "RGBA"),
    "JPEG": encoded("JPEG"),
    "WEBP": encoded("WEBP"),
    "PNG-L": encoded("PNG", "L"),
}


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def check_only_4xx(data: bytes) -> None:
    try:
        for opened in open_images([data], LIMITS, (64, 64)):
            decode(opened)
    except ServeError as exc:
        assert 400 <= exc.status < 500, f"{exc.status} {exc.message}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 4096)),
)
def test_mutated_image_files_fail_only_with_a_4xx(seed, edits, cut):
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    check_only_4xx(bytes(data[:cut] if cut is not None else data))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    inserted=st.lists(st.tuples(st.sampled_from(PNG_CHUNKS), st.binary(max_size=64), st.booleans()), min_size=1, max_size=4),
    base=st.sampled_from(["PNG", "PNG-RGBA", "PNG-L"]),
)
def test_png_chunks_with_any_payload_before_or_after_the_image_data_fail_only_with_a_4xx(inserted, base):
    """Well-formed chunks (right lengths and CRCs) whose contents are anything: the decoder's chunk
    handlers run on them, before IDAT or, as the iCCP crash did, after it."""
    png = SEEDS[base]
    first_idat, end = png.index(b"IDAT") - 4, png.rindex(b"IEND") - 4
    before = b"".join(chunk(kind, payload) for kind, payload, after in inserted if not after)
    after = b"".join(chunk(kind, payload) for kind, payload, after in inserted if after)
    check_only_4xx(png[:first_idat] + before + png[first_idat:end] + after + png[end:])


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)
IMAGE_DATA = st.just("aGVsbG8=") | st.text(max_size=12)
INPUT_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["image", "pixels", "other"]) | JSON_VALUES,
        "datatype": st.sampled_from(["BYTES", "UINT8", "FP32", "INT64"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-1, 4), max_size=4) | JSON_VALUES,
        "data": st.lists(IMAGE_DATA | st.integers(0, 300) | JSON_VALUES, max_size=6) | JSON_VALUES,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 20) | JSON_VALUES}) | JSON_VALUES,
    },
)
OUTPUT_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["scores", "labels", "mask", "boxes"]) | JSON_VALUES,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data": JSON_VALUES}) | JSON_VALUES,
    },
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(INPUT_SPECS, max_size=3) | JSON_VALUES,
        "outputs": st.lists(OUTPUT_SPECS, max_size=3) | JSON_VALUES,
        "parameters": st.fixed_dictionaries({}, optional={k: JSON_VALUES for k in ("top_k", "min_score", "binary_data_output")})
        | JSON_VALUES,
        "id": JSON_VALUES,
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=HEADERS | JSON_VALUES,
    binary=st.binary(max_size=16),
    header_length=st.one_of(st.none(), st.integers(-2, 400).map(str), st.text(max_size=4)),
)
def test_any_inference_request_json_fails_only_with_a_4xx(header, binary, header_length):
    text = json.dumps(header).encode()
    body = text + binary if header_length is not None else text
    try:
        parsed, images = parse_request(body, header_length)
        check_image_count(len(images), 8)
        answer = OipAnswer("model", parsed)
        for kind in KINDS.values():
            answer.read(kind)
    except ServeError as exc:
        assert exc.status in (400, 413), f"{exc.status} {exc.message}"
