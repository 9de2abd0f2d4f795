"""Each kind's post-process: results mapped back to the original image (letterbox and resize, boxes,
class maps) and written as /v1 JSON (PNG masks, RLE), within the answer's budget."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.adapters.kinds import Options, get_kind
from monaserve.adapters.kinds.segment import json_length, rle_encode
from monaserve.adapters.transforms import preprocess
from monaserve.server.budgets import ResponseBudget
from monaserve.server.errors import ResponseTooLarge

from helpers import make_manifest

DETECT, SEGMENT = get_kind("detect"), get_kind("segment")


def segment(class_ids, manifest, prepared, rle: bool, budget: ResponseBudget):
    """The /v1 JSON result of one segment prediction."""
    options = Options(rle=rle)
    return SEGMENT.to_json(SEGMENT.postprocess(class_ids, manifest.labels, prepared, options), options, budget)


def rle_decode(counts: list[int], height: int, width: int) -> np.ndarray:
    flat = np.concatenate([np.full(n, i % 2, dtype=np.uint8) for i, n in enumerate(counts)])
    return flat.reshape((width, height)).T


@pytest.mark.parametrize("resize", ["resize", "letterbox"])
def test_box_in_model_pixels_maps_back_to_the_original(resize, manifest):
    image = Image.new("RGB", (400, 200))
    prepared = preprocess(image, InputSpec(size=(256, 256), resize=resize))
    if resize == "letterbox":  # 400x200 -> 256x128, padded 64 rows on top
        assert prepared.offset == (64, 0) and prepared.scale == (128 / 200, 256 / 400)
        model_box = [64.0, 64 + 32.0, 128.0, 64 + 96.0]
    else:
        model_box = [64.0, 64.0, 128.0, 192.0]
    output = {"boxes": torch.tensor([model_box, model_box]), "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 0])}
    result = DETECT.postprocess(output, manifest.labels, prepared, Options(min_score=0.5))
    assert (result.width, result.height) == (400, 200)
    assert len(result.detections) == 1 and result.detections[0].label == "b"
    expected = (100.0, 50.0, 200.0, 150.0)
    assert result.detections[0].box == pytest.approx(expected, abs=0.01)


@pytest.fixture
def manifest(shared_backbone):
    return make_manifest(shared_backbone, "t", num_labels=3).model_copy(update={"labels": ["a", "b", "c"]})


def test_letterboxed_class_map_is_cropped_and_resized():
    prepared = preprocess(Image.new("RGB", (400, 200)), InputSpec(size=(256, 256), resize="letterbox"))
    class_ids = torch.full((256, 256), 9, dtype=torch.int32)  # padding rows hold junk
    class_ids[64:192, :128] = 1
    class_ids[64:192, 128:] = 2
    mask = prepared.class_map_to_original(class_ids)
    assert mask.shape == (200, 400)
    assert (mask[:, :200] == 1).all() and (mask[:, 200:] == 2).all()


def test_rle_round_trip_and_areas():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 30, size=2)
        binary = rng.random((h, w)) < rng.random()
        counts = rle_encode(binary)
        assert sum(counts) == h * w
        assert json_length(counts) == len(json.dumps(counts.tolist(), separators=(",", ":")))
        assert np.array_equal(rle_decode(counts, h, w), binary.astype(np.uint8))
    assert rle_encode(np.ones((2, 2), bool)).tolist() == [0, 4]
    assert rle_encode(np.array([[0, 1], [0, 1]], bool)).tolist() == [2, 2]


def test_segment_result_png_and_rle(manifest):
    prepared = preprocess(Image.new("RGB", (30, 20)), InputSpec(size=(64, 64)))
    class_ids = torch.zeros(64, 64, dtype=torch.int32)
    class_ids[:, 32:] = 2
    result = segment(class_ids, manifest, prepared, rle=True, budget=ResponseBudget(2**20))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.mask_png))))
    assert mask.shape == (20, 30) and set(np.unique(mask)) == {0, 2}
    assert sum(c.pixels for c in result.classes) == 600
    for area in result.classes:
        assert np.array_equal(rle_decode(area.rle, 20, 30), (mask == area.index).astype(np.uint8))
    assert segment(class_ids, manifest, prepared, rle=False, budget=ResponseBudget(2**20)).classes[0].rle is None


def test_segment_stops_at_its_response_budget(manifest):
    """The RLE of a noisy mask is charged before it is built into JSON: past the budget, a clear 400."""
    prepared = preprocess(Image.new("RGB", (64, 64)), InputSpec(size=(64, 64)))
    noisy = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (64, 64))).to(torch.int32)
    segment(noisy, manifest, prepared, rle=False, budget=ResponseBudget(8_000))
    with pytest.raises(ResponseTooLarge, match="--max-response-mb"):
        segment(noisy, manifest, prepared, rle=True, budget=ResponseBudget(8_000))


def test_images_are_prepared_as_uint8_and_letterbox_padding_normalises_to_about_zero():
    from monaserve.adapters.transforms import normalize, spec_norm

    spec = InputSpec(size=(256, 256), resize="letterbox")
    prepared = preprocess(Image.new("RGB", (400, 200), (255, 0, 0)), spec)
    assert prepared.tensor.dtype == torch.uint8 and prepared.tensor.shape == (3, 256, 256)
    assert prepared.tensor[:, 64:192].float().mean(dim=(1, 2)).tolist() == [255.0, 0.0, 0.0]
    padding = normalize(prepared.tensor[:, :64], *spec_norm(spec))
    assert padding.abs().max() < 0.01  # the mean colour, rounded to uint8
