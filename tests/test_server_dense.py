"""Detect and segment through the app: boxes and masks in the original image's pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from monaserve.adapters import AdapterPackage, Backbone, InputSpec, expected_shapes
from monaserve.adapters.kinds import DetectHeadConfig, Options, get_kind
from monaserve.server.budgets import ResponseBudget
from monaserve.server.engine import Engine

from app_harness import InProcessServer
from helpers import TINY, make_manifest, prepare_as_served, random_adapter_tensors
from server_harness import image_bytes, store_of


def dense_package(backbone, name: str, kind: str, labels: int, seed: int, head=None, **input_spec) -> AdapterPackage:
    fields = {"head": head} if head is not None else {}
    manifest = make_manifest(backbone, name, num_labels=labels, kind=kind, input=InputSpec(**input_spec), **fields)
    return AdapterPackage(manifest, random_adapter_tensors(expected_shapes(manifest, backbone), seed))


@pytest.fixture(scope="module")
def packages(shared_backbone):
    return {
        "boxes": dense_package(
            shared_backbone, "boxes", "detect", 3, seed=1, head=DetectHeadConfig(min_score=0.42), size=(256, 256), resize="letterbox"
        ),
        "masks": dense_package(shared_backbone, "masks", "segment", 4, seed=2, size=(224, 224)),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, packages):
    with InProcessServer(tiny_weights, store_of(tmp_path_factory, packages.values())) as server:
        yield server


@pytest.fixture(scope="module")
def local(tiny_weights, packages):
    engine = Engine(Backbone.load(TINY, tiny_weights), num_slots=2)
    for slot, package in enumerate(packages.values()):
        engine.install(slot, package)
    return engine


def local_result(engine, packages, task, data, **options):
    slot = list(packages).index(task)
    manifest = packages[task].manifest
    prepared = prepare_as_served(data, manifest.input)
    output = engine.run(prepared.tensor[None], [slot])[0]
    kind = get_kind(manifest.kind)
    options = Options(**options).with_defaults(kind.defaults(manifest.head))
    return kind.to_json(kind.postprocess(output, manifest.labels, prepared, options), options, ResponseBudget(2**30))


def test_detect_returns_boxes_in_original_pixels(server, packages, local):
    data = image_bytes(3, size=(320, 200))
    with server.client() as client:
        response = client.post("/v1/tasks/boxes/detect?min_score=0.3", files={"image": ("x.jpg", data)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "detect" and body["version"] == 1
    result = body["results"][0]
    assert (result["width"], result["height"]) == (320, 200)
    assert result["detections"], "random weights with biased logits give boxes"
    for d in result["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 320 and 0 <= y1 <= y2 <= 200
        assert d["score"] >= 0.3 and d["label"] == packages["boxes"].manifest.labels[d["index"]]
    expected = local_result(local, packages, "boxes", data, min_score=0.3)
    assert len(expected.detections) == len(result["detections"])
    top = expected.detections[0]
    assert result["detections"][0]["box"] == pytest.approx(list(top.box), abs=0.05)


def test_detect_options_default_to_the_tasks_own_on_both_protocols(server, packages, local):
    """A request that leaves the detect options out gets the task's (its head config's), listed in its
    description; one that gives them gets those, on /v1 and /v2 alike; a value out of range is refused."""
    data = image_bytes(3, size=(320, 200))
    head = packages["boxes"].manifest.head
    with server.client() as client:
        described = client.get("/v1/tasks/boxes").json()["defaults"]
        assert described == {"min_score": 0.42, "max_detections": head.max_detections, "class_agnostic": False}

        def v1(query: str = "") -> list[dict]:
            response = client.post(f"/v1/tasks/boxes/detect{query}", content=data, headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
            return response.json()["results"][0]["detections"]

        def v2(**parameters) -> int:
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]}
            response = client.post("/v2/models/boxes/infer", json={**body, "parameters": {"binary_data_output": False, **parameters}})
            assert response.status_code == 200, response.text
            return next(o for o in response.json()["outputs"] if o["name"] == "num_detections")["data"][0]

        as_task = local_result(local, packages, "boxes", data).detections
        assert [d["score"] for d in v1()] == pytest.approx([d.score for d in as_task], abs=1e-4)
        assert all(d.score >= head.min_score for d in as_task) and v2() == len(as_task)
        every = v1("?min_score=0")
        assert len(every) >= len(as_task) and len(every) <= head.max_detections
        assert [d["score"] for d in v1("?min_score=0&max_detections=3")] == [d["score"] for d in every[:3]]
        assert v2(min_score=0.0, max_detections=3) == 3
        one_per_object = v1("?min_score=0&class_agnostic=true")
        expected = local_result(local, packages, "boxes", data, min_score=0.0, class_agnostic=True).detections
        assert [d["score"] for d in one_per_object] == pytest.approx([d.score for d in expected], abs=1e-4)
        assert v2(min_score=0.0, class_agnostic=True) == len(expected)  # (what it drops: tests/test_postprocess.py)
        for query in ("?max_detections=0", "?min_score=2", "?class_agnostic=maybe"):
            refused = client.post(f"/v1/tasks/boxes/detect{query}", content=data, headers={"content-type": "image/jpeg"})
            assert refused.status_code == 422, refused.text
        image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}
        bad = client.post("/v2/models/boxes/infer", json={"inputs": [image], "parameters": {"max_detections": 0}})
        assert bad.status_code == 400 and "'max_detections' must be an integer in 1..1000" in bad.json()["error"], bad.text


def test_segment_returns_a_mask_at_the_original_size(server, packages, local):
    data = image_bytes(4, size=(300, 180), fmt="PNG")
    with server.client() as client:
        response = client.post("/v1/tasks/masks/segment?rle=true", files={"image": ("x.png", data)})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask_png"]))))
    assert mask.shape == (180, 300) and mask.max() < 4
    assert sum(c["pixels"] for c in result["classes"]) == 300 * 180
    assert all(c["rle"] and sum(c["rle"]) == 300 * 180 for c in result["classes"])
    expected = local_result(local, packages, "masks", data)
    expected_mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(expected.mask_png))))
    assert (mask == expected_mask).mean() > 0.999


def test_each_route_refuses_the_other_kinds(server):
    with server.client() as client:
        wrong = client.post("/v1/tasks/masks/detect", files={"image": ("x", image_bytes(1))})
        assert wrong.status_code == 409 and wrong.json()["message"].endswith("use /v1/tasks/masks/segment")
        assert client.post("/v1/tasks/boxes/classify", files={"image": ("x", image_bytes(1))}).status_code == 409


def test_a_large_jpeg_decoded_at_reduced_scale_still_maps_to_its_original_pixels(server, packages, local):
    """A 2600x1700 JPEG for a 256x256 letterbox task decodes at 1/4 scale; boxes come back in the
    original's pixels and match what the same reduced decode gives in process."""
    data = image_bytes(5, size=(2600, 1700))
    with server.client() as client:
        response = client.post("/v1/tasks/boxes/detect?min_score=0.3", content=data, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["width"], result["height"]) == (2600, 1700)
    assert all(0 <= d["box"][0] <= d["box"][2] <= 2600 and 0 <= d["box"][1] <= d["box"][3] <= 1700 for d in result["detections"])
    expected = local_result(local, packages, "boxes", data, min_score=0.3)
    served = [v for d in result["detections"] for v in d["box"]]
    assert served == pytest.approx([v for d in expected.detections for v in d.box], abs=0.5)
