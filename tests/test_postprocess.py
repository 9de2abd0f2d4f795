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
from monaserve.adapters.kinds import DetectHeadConfig, Options, get_kind
from monaserve.adapters.kinds.segment import json_length, rle_encode
from monaserve.adapters.metrics import best_f1
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
    result = DETECT.postprocess(
        output, manifest.labels, prepared, Options(min_score=0.5).with_defaults(DETECT.defaults(DetectHeadConfig()))
    )
    assert (result.width, result.height) == (400, 200)
    assert len(result.detections) == 1 and result.detections[0].label == "b"
    expected = (100.0, 50.0, 200.0, 150.0)
    assert result.detections[0].box == pytest.approx(expected, abs=0.01)


def boxes(*rows: tuple[float, float, float, float, float, int]) -> dict[str, torch.Tensor]:
    """A head's output (or a target, scores ignored) from (x1, y1, x2, y2, score, label) rows, best first."""
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": table[:, :4], "scores": table[:, 4], "labels": table[:, 5].long()}


def detect(output: dict[str, torch.Tensor], head: DetectHeadConfig | None = None, **asked) -> list[tuple[str, float]]:
    """(label, score) of each box a request asking `asked` of a task with `head` gets, as the data plane fills in defaults."""
    prepared = preprocess(Image.new("RGB", (128, 128)), InputSpec(size=(128, 128)))
    options = Options(**asked).with_defaults(DETECT.defaults(head or DetectHeadConfig()))
    return [(d.label, round(d.score, 3)) for d in DETECT.postprocess(output, ["a", "b", "c"], prepared, options).detections]


def test_detect_answers_follow_the_task_defaults_unless_the_request_says_otherwise():
    output = boxes((0, 0, 50, 50, 0.9, 0), (1, 1, 51, 51, 0.8, 1), (60, 60, 90, 90, 0.5, 2), (0, 60, 30, 90, 0.2, 0), (5, 5, 9, 9, 0.1, 1))
    assert [score for _, score in detect(output)] == pytest.approx([0.9, 0.8, 0.5])  # the fallback 0.3 for a package naming none
    assert len(detect(output, DetectHeadConfig(min_score=0.15))) == 4  # the task's own, picked by its trainer
    assert len(detect(output, DetectHeadConfig(min_score=0.15), min_score=0.0)) == 5  # the request's
    assert [label for label, _ in detect(output, min_score=0.0, max_detections=2)] == ["a", "b"]  # the best two
    assert len(detect(output, DetectHeadConfig(max_detections=1))) == 1
    # one box per object: "b" at 0.8 overlaps "a" at 0.9 (IoU 0.92) and goes; the rest overlap nothing
    assert detect(output, min_score=0.0, class_agnostic=True) == [("a", 0.9), ("c", 0.5), ("a", 0.2), ("b", 0.1)]
    assert detect(output, DetectHeadConfig(nms_threshold=0.95), class_agnostic=True) == detect(output)  # the task's IoU


def test_best_f1_picks_the_lowest_score_of_the_best_trade_off():
    truth = [boxes((0, 0, 10, 10, 1, 0), (20, 20, 30, 30, 1, 1)), boxes((0, 0, 10, 10, 1, 0))]
    found = [
        boxes((0, 0, 10, 10, 0.9, 0), (0, 0, 10, 10, 0.8, 0), (20, 20, 30, 30, 0.6, 1), (50, 50, 60, 60, 0.3, 1)),
        boxes((1, 1, 10, 10, 0.7, 0), (20, 20, 30, 30, 0.65, 0)),
    ]
    # by score: 0.9 hit, 0.8 duplicate, 0.7 hit, 0.65 wrong place, 0.6 hit (3 of 3), 0.3 miss: F1 = 2*3/(5+3) at 0.6
    assert best_f1(found, truth, num_classes=2) == pytest.approx((0.75, 0.6))
    assert best_f1([boxes((50, 50, 60, 60, 0.9, 0))], [truth[1]], num_classes=2) == (0.0, 0.0)  # nothing right: no pick
    tied = [boxes((0, 0, 10, 10, 0.5, 0), (40, 40, 50, 50, 0.5, 0))]  # a threshold keeps both of a tie, or neither
    assert best_f1(tied, [truth[1]], num_classes=2) == pytest.approx((2 / 3, 0.5))


def test_the_trainer_writes_the_best_f1_defaults_into_a_detect_head_only_where_a_box_was_right():
    head = DetectHeadConfig()

    def tuned(f1: float, at: float, agnostic_f1: float = 0.0, agnostic_at: float = 0.0) -> tuple[float, bool]:
        picks = {"f1": f1, "f1_min_score": at, "f1_agnostic": agnostic_f1, "f1_agnostic_min_score": agnostic_at}
        tuned = DETECT.tune_head(head, {"mAP": 0.2, **picks})
        return tuned.min_score, tuned.class_agnostic

    assert tuned(0.6, 0.42) == (0.42, False)
    assert tuned(0.6, 0.01) == (head.score_threshold, False)  # never below the head's own candidates
    assert tuned(0.6, 0.42, agnostic_f1=0.7, agnostic_at=0.3) == (0.3, True)  # one box per object scores better
    assert tuned(0.6, 0.42, agnostic_f1=0.6, agnostic_at=0.3) == (0.42, False)  # a tie keeps the boxes as they come
    assert DETECT.tune_head(head, {"mAP": 0.0, "f1": 0.0, "f1_min_score": 0.0, "f1_agnostic": 0.0, "f1_agnostic_min_score": 0.0}) == head


def test_the_evaluation_tries_one_box_per_object_where_the_head_repeats_a_box_under_other_labels():
    truth = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}

    def picks(*rows) -> tuple[float, float, float, float]:
        metric = DETECT.metric(num_classes=2)
        metric.update([boxes(*rows)], [truth])
        found = metric.compute()
        return found["f1"], found["f1_min_score"], found["f1_agnostic"], found["f1_agnostic_min_score"]

    # the first object found twice, the second time under the wrong label, above the second object's score:
    # as they come, the best F1 keeps the duplicate (2·2 / (3 + 2)); one box per object drops it (2·2 / (2 + 2))
    assert picks((0, 0, 10, 10, 0.9, 0), (0, 0, 10, 10, 0.8, 1), (20, 20, 30, 30, 0.7, 1)) == pytest.approx((0.8, 0.7, 1.0, 0.7))
    # the wrong label first: keeping one box per object keeps the wrong one
    assert picks((0, 0, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 0))[2] < picks((0, 0, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 0))[0]


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
