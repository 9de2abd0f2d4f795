"""Open Inference Protocol v2 against a real server, with requests built to the protocol's text."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from monaserve.adapters.synthetic import random_package

from app_harness import InProcessServer
from server_harness import TOKEN, image_bytes, store_of

HEADER = "Inference-Header-Content-Length"
OVERRUN = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":99}}]}'


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    """pets (classify, versions 1 and 2), boxes (detect) and masks (segment)."""
    tasks = [("pets", "classify", 1), ("pets", "classify", 2), ("boxes", "detect", 1), ("masks", "segment", 1)]
    packages = [random_package(shared_backbone, name, seed=len(name), kind=kind, num_labels=4, version=v) for name, kind, v in tasks]
    with InProcessServer(tiny_weights, store_of(tmp_path_factory, packages), admin_token=TOKEN) as server:
        yield server


@pytest.fixture
def http(server):
    return server.client(token=None)


def bytes_input(*images: bytes) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": [base64.b64encode(i).decode() for i in images]}


def tensor(response: dict, name: str) -> np.ndarray:
    (output,) = [o for o in response["outputs"] if o["name"] == name]
    values = np.array(output["data"], dtype=object if output["datatype"] == "BYTES" else None)
    return values.reshape(output["shape"])


def answer(response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def test_server_metadata_and_health_bodies_follow_the_protocol(http):
    """The protocol's REST text: `{"live": bool}`, `{"ready": bool}`, `{"name", "ready"}` for a model."""
    metadata = answer(http.get("/v2"))
    assert metadata["name"] == "monaserve" and metadata["version"] == "0.1.0"
    assert {"binary_tensor_data", "classification", "model_repository", "parameters"} <= set(metadata["extensions"])
    assert answer(http.get("/v2/health/live")) == {"live": True}
    assert answer(http.get("/v2/health/ready")) == {"ready": True}
    assert answer(http.get("/v2/models/pets/ready")) == {"name": "pets", "ready": True}
    assert answer(http.get("/v2/models/pets/versions/1/ready")) == {"name": "pets", "ready": True}
    missing = http.get("/v2/models/nope/ready")
    assert missing.status_code == 404 and list(missing.json()) == ["error"]
    assert "unknown task 'nope'; the tasks are boxes, masks, pets (GET /v1/tasks)" in missing.json()["error"]


def test_model_metadata_declares_the_one_input_a_request_sends(http):
    """Generic tools fill every declared input: only `image` is declared; `pixels` is named as its alternative."""
    metadata = answer(http.get("/v2/models/boxes"))
    assert metadata["name"] == "boxes" and metadata["versions"] == ["1"] and metadata["platform"] == "monaserve"
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert "pixels" in metadata["parameters"]["alternative_input"]
    assert [o["name"] for o in metadata["outputs"]] == ["boxes", "scores", "labels", "indices", "num_detections"]
    assert answer(http.get("/v2/models/boxes/versions/1")) == metadata
    assert answer(http.get("/v2/models/pets"))["versions"] == ["1", "2"]
    assert http.get("/v2/models/boxes/versions/7").status_code == 404


def test_classify_with_json_bytes_matches_the_v1_route(http):
    images = [image_bytes(1), image_bytes(2)]
    request = {"id": "r-1", "inputs": [bytes_input(*images)], "parameters": {"top_k": 3}}
    response = http.post("/v2/models/pets/infer", json=request).json()
    assert (response["model_name"], response["model_version"], response["id"]) == ("pets", "2", "r-1")
    scores, labels = tensor(response, "scores"), tensor(response, "labels")
    assert scores.shape == (2, 3) and labels.shape == (2, 3) and tensor(response, "indices").shape == (2, 3)
    for i, image in enumerate(images):
        v1 = http.post("/v1/tasks/pets/classify?top_k=3", content=image, headers={"content-type": "image/jpeg"}).json()
        top = v1["results"][0]["top"]
        assert list(labels[i]) == [t["label"] for t in top]
        np.testing.assert_allclose(scores[i].astype(float), [t["score"] for t in top], atol=1e-4)


def test_uint8_pixels_equal_the_same_image_encoded(http):
    pixels = np.asarray(Image.open(io.BytesIO(image_bytes(3, size=(64, 48), fmt="PNG"))))
    as_pixels = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}]}
    as_png = {"inputs": [bytes_input(image_bytes(3, size=(64, 48), fmt="PNG"))]}
    a = http.post("/v2/models/pets/infer", json=as_pixels).json()
    b = http.post("/v2/models/pets/infer", json=as_png).json()
    np.testing.assert_allclose(tensor(a, "scores").astype(float), tensor(b, "scores").astype(float), atol=1e-5)


def test_binary_tensor_extension_both_ways(http):
    images = [image_bytes(4), image_bytes(5)]
    data = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "labels", "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header).encode()
    response = http.post(
        "/v2/models/pets/infer", content=text + data, headers={HEADER: str(len(text)), "content-type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    body = json.loads(response.content[:length])
    rest = response.content[length:]
    scores_out, labels_out = body["outputs"]
    scores = np.frombuffer(rest[: scores_out["parameters"]["binary_data_size"]], dtype="<f4").reshape(scores_out["shape"])
    raw = rest[scores_out["parameters"]["binary_data_size"] :]
    assert len(raw) == labels_out["parameters"]["binary_data_size"]
    labels, position = [], 0
    while position < len(raw):
        (n,) = struct.unpack_from("<I", raw, position)
        labels.append(raw[position + 4 : position + 4 + n].decode())
        position += 4 + n
    as_json = http.post("/v2/models/pets/infer", json={"inputs": [bytes_input(*images)]}).json()
    np.testing.assert_allclose(scores, tensor(as_json, "scores").astype(float), atol=1e-6)
    assert labels == list(tensor(as_json, "labels").ravel())


def test_detect_outputs_are_padded_per_image(http):
    response = http.post(
        "/v2/models/boxes/versions/1/infer", json={"inputs": [bytes_input(image_bytes(6), image_bytes(7, size=(90, 60)))]}
    ).json()
    counts = tensor(response, "num_detections")
    boxes = tensor(response, "boxes")
    assert boxes.shape[0] == 2 and boxes.shape[2] == 4 and boxes.shape[1] == max(counts)
    assert tensor(response, "labels").shape == boxes.shape[:2]
    for i, count in enumerate(counts):
        assert (boxes[i, count:] == 0).all() and (tensor(response, "labels")[i, count:] == "").all()


def test_segment_mask_matches_the_v1_png(http):
    image = image_bytes(8, size=(80, 50))
    response = http.post("/v2/models/masks/infer", json={"inputs": [bytes_input(image)], "outputs": [{"name": "mask"}]}).json()
    mask = tensor(response, "mask")
    v1 = http.post("/v1/tasks/masks/segment", content=image, headers={"content-type": "image/jpeg"}).json()
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(v1["results"][0]["mask_png"]))))
    assert mask.shape == (1, 50, 80) and (mask[0] == png).all()
    mixed = http.post("/v2/models/masks/infer", json={"inputs": [bytes_input(image, image_bytes(9, size=(30, 30)))]})
    assert mixed.status_code == 400 and "one size" in mixed.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "complaint"),
    [
        (b"{not json", {}, "not valid JSON"),
        (json.dumps({"inputs": []}).encode(), {}, "non-empty 'inputs'"),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]}).encode(),
            {},
            "1 values for a shape of 2",
        ),
        (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}).encode(), {}, "base64"),
        (json.dumps({"inputs": [{"name": "image", "datatype": "NOPE", "shape": [1], "data": [""]}]}).encode(), {}, "unknown datatype"),
        (
            json.dumps({"inputs": [{"name": "other", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]}).encode(),
            {},
            "exactly one input",
        ),
        (OVERRUN + b"\x00" * 10, {HEADER: str(len(OVERRUN))}, "past the end"),
        (
            json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 4], "data": [0] * 16}]}).encode(),
            {},
            "UINT8 of shape",
        ),
        (json.dumps({"inputs": [bytes_input(image_bytes(0))], "outputs": [{"name": "boxes"}]}).encode(), {}, "unknown output"),
        (json.dumps({"inputs": [bytes_input(b"not an image")]}).encode(), {}, "not a JPEG"),
        (json.dumps({"inputs": [bytes_input(image_bytes(0))], "parameters": {"top_k": "many"}}).encode(), {}, "top_k"),
    ],
    ids=["json", "no-inputs", "count", "base64", "datatype", "input-name", "binary-size", "pixels-shape", "output", "image", "parameter"],
)
def test_bad_requests_get_400_with_an_error(http, body, headers, complaint):
    response = http.post("/v2/models/pets/infer", content=body, headers={"content-type": "application/json", **headers})
    assert 400 <= response.status_code < 500 and list(response.json()) == ["error"]
    assert complaint in response.json()["error"]


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def assert_states_agree(http) -> list[dict]:
    """The index, model readiness, metadata and inference say the same of every version: READY ones
    are ready and serve, the others are not and do not. Returns the index."""
    index = answer(http.post("/v2/repository/index", headers=ADMIN))
    image = bytes_input(image_bytes(0))
    for model in index:
        ready = model["state"] == "READY"
        path = f"/v2/models/{model['name']}/versions/{model['version']}"
        assert answer(http.get(path + "/ready"), 200 if ready else 400) == {"name": model["name"], "ready": ready}
        assert http.get(path).status_code == (200 if ready else 404), model
        assert http.post(path + "/infer", json={"inputs": [image]}).status_code == (200 if ready else 404), model
    return index


def test_repository_extension(server, http):
    assert http.post("/v2/repository/index").status_code == 401
    index = assert_states_agree(http)
    assert [m for m in index if m["name"] == "pets"] == [
        {"name": "pets", "version": v, "state": "READY", "reason": ""} for v in ("1", "2")
    ], "a loaded task serves every stored version (pinned): each is READY"
    unload = http.post("/v2/repository/models/pets/unload", headers=ADMIN, json={"parameters": {"unload_dependents": True}})
    assert unload.status_code == 200
    try:
        index = assert_states_agree(http)
        assert [(m["state"], m["reason"]) for m in index if m["name"] == "pets"] == [("UNAVAILABLE", "unloaded")] * 2
        assert "unloaded" in answer(http.get("/v2/models/pets"), 404)["error"]
        assert answer(http.post("/v2/repository/index", headers=ADMIN, json={"ready": True})) == [m for m in index if m["state"] == "READY"]
    finally:
        assert http.post("/v2/repository/models/pets/load", headers=ADMIN).status_code == 200
    assert answer(http.get("/v2/models/pets/ready")) == {"name": "pets", "ready": True}
    assert http.post("/v2/repository/models/nope/load", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    "action, parameters, complaint",
    [
        ("load", {"config": '{"max_batch_size": 8}'}, "configuration comes from its adapter package"),
        ("load", {"file:1/model.safetensors": "AAAA"}, "uploaded as packages"),
        ("load", {"unload_dependents": True}, "unknown load parameter"),
        ("unload", {"unload_dependents": "yes"}, "true or false"),
        ("unload", {"force": True}, "unknown unload parameter"),
    ],
)
def test_repository_parameters_are_honoured_or_refused(http, action, parameters, complaint):
    response = http.post(f"/v2/repository/models/pets/{action}", headers=ADMIN, json={"parameters": parameters})
    assert complaint in answer(response, 400)["error"]
    assert answer(http.get("/v2/models/pets/ready")) == {"name": "pets", "ready": True}, "a refused call changes nothing"


def test_requests_are_checked_before_inference(server, http):
    """Parameters, outputs and nesting are refused up front (4xx), never as a 500 after the GPU work."""
    image = bytes_input(image_bytes(0))
    for body, complaint in [
        ({"inputs": [image], "parameters": {"top_k": -1}}, "top_k"),
        ({"inputs": [image], "parameters": "fast"}, "'parameters' must be a JSON object"),
        ({"inputs": [image], "outputs": [{"name": "scores", "parameters": 3}]}, "must be a JSON object"),
    ]:
        response = http.post("/v2/models/pets/infer", json=body)
        assert response.status_code == 400 and complaint in response.json()["error"], response.text
    deep = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    response = http.post("/v2/models/pets/infer", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested" in response.json()["error"]
    too_large = http.post("/v2/models/pets/infer", content=b"x" * (65 * 2**20), headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and list(too_large.json()) == ["error"] and "(--max-request-mb)" in too_large.json()["error"]


def test_the_model_is_resolved_before_the_request_is_judged(http):
    """An unknown model is a 404 whatever its parameters; an empty `outputs` asks for every output; a
    route without a version takes none from the query string."""
    image = bytes_input(image_bytes(0))
    assert http.post("/v2/models/nope/infer", json={"inputs": [image], "parameters": {"top_k": 0}}).status_code == 404
    every = http.post("/v2/models/pets/infer", json={"inputs": [image], "outputs": []})
    assert every.status_code == 200 and [o["name"] for o in every.json()["outputs"]] == ["scores", "labels", "indices"]
    assert http.post("/v2/models/pets/infer?version=99", json={"inputs": [image]}).status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    for route in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer"):
        for operation in paths[route].values():
            assert "version" not in [p["name"] for p in operation["parameters"]], route


def test_too_many_images_is_the_same_413_on_both_protocols(http):
    """One limit in the data plane: --max-images-per-request (64 here), refused before anything is decoded."""
    many = [b"not even an image"] * 65
    v2 = http.post("/v2/models/pets/infer", json={"inputs": [bytes_input(*many)]})
    v1 = http.post("/v1/tasks/pets/classify", json={"images": [base64.b64encode(m).decode() for m in many]})
    assert v2.status_code == v1.status_code == 413
    assert "65 images in one request; the limit is 64" in v2.json()["error"] and v2.json()["error"].endswith(v1.json()["message"])


def test_an_unloaded_model_serves_no_version(server, http):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    http.post("/v2/repository/models/boxes/unload", headers=admin).raise_for_status()
    try:
        assert http.get("/v2/models/boxes/versions/1/ready").status_code == 400
        pinned = http.post("/v2/models/boxes/versions/1/infer", json={"inputs": [bytes_input(image_bytes(0))]})
        assert pinned.status_code == 404 and "unloaded" in pinned.json()["error"]
    finally:
        http.post("/v2/repository/models/boxes/load", headers=admin).raise_for_status()


def test_a_mask_is_charged_to_the_answer_budget_once(shared_backbone):
    """A 1000x800 binary mask (800,000 bytes) fits a 1,000,000-byte answer budget: it is checked before
    the mask is built and charged once as it is encoded."""
    from monaserve.adapters import InputSpec
    from monaserve.adapters.kinds import Options, get_kind
    from monaserve.adapters.transforms import preprocess
    from monaserve.server.budgets import ResponseBudget
    from monaserve.server.dataplane import InferResult
    from monaserve.server.oip_answer import OipAnswer

    from helpers import make_manifest

    manifest = make_manifest(shared_backbone, "masks", num_labels=3, kind="segment", input=InputSpec(size=(64, 64)))
    prepared = preprocess(Image.new("RGB", (1000, 800)), manifest.input)
    kind = get_kind("segment")
    segmentation = kind.postprocess(torch.zeros(64, 64, dtype=torch.int32), manifest.labels, prepared, Options())
    answer = OipAnswer("masks", {"outputs": [{"name": "mask", "parameters": {"binary_data": True}}]})
    options = answer.read(kind)
    budget = ResponseBudget(1_000_000)
    body, headers = answer(InferResult("masks", kind, 1, [segmentation], options, {}, budget))
    assert len(body) - int(headers[HEADER]) == 800_000 and budget.used == 800_000


def test_request_parameters_are_honoured_or_refused(http):
    """Triton's `priority` and `timeout` (microseconds) and unknown names are never silently ignored."""
    image = bytes_input(image_bytes(0))

    def infer(parameters: dict, status: int) -> dict:
        return answer(http.post("/v2/models/pets/infer", json={"inputs": [image], "parameters": parameters}), status)

    assert "unknown parameter 'temperature'" in infer({"temperature": 0.5}, 400)["error"]
    assert "same priority" in infer({"priority": 2}, 400)["error"]
    infer({"priority": 0, "timeout": 30_000_000}, 200)
    assert "within 1e-06 s" in infer({"timeout": 1}, 504)["error"]
    assert "'timeout'" in infer({"timeout": -5}, 400)["error"]
    unknown = http.post("/v2/models/pets/infer", json={"inputs": [image], "outputs": [{"name": "scores", "parameters": {"fmt": 1}}]})
    assert "unknown parameter 'fmt'" in answer(unknown, 400)["error"]


def test_the_classification_extension_answers_score_index_label_strings(http):
    """An output's `classification: k` answers the best k as "score:index:label", as Triton does."""
    image = bytes_input(image_bytes(3))
    plain = answer(http.post("/v2/models/pets/infer", json={"inputs": [image], "parameters": {"top_k": 4}}))
    scores, indices, labels = (tensor(plain, name) for name in ("scores", "indices", "labels"))
    expected = [f"{s:f}:{i}:{label}" for s, i, label in zip(scores[0], indices[0], labels[0])]
    for classes, shown in ((2, 2), (9, 4)):  # 4 labels: no more than 4 strings
        body = {"inputs": [image], "outputs": [{"name": "scores", "parameters": {"classification": classes}}, {"name": "indices"}]}
        classified = answer(http.post("/v2/models/pets/infer", json=body))
        (output,) = [o for o in classified["outputs"] if o["name"] == "scores"]
        assert output["datatype"] == "BYTES" and output["shape"] == [1, shown]
        assert output["data"] == expected[:shown]
    detect = {"inputs": [image], "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}
    assert "applies to the 'scores' output of classify models" in answer(http.post("/v2/models/boxes/infer", json=detect), 400)["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies_answer_as_plain_ones(http, encoding):
    """`Content-Encoding: gzip` or `deflate` (the zlib format, as Triton's clients send it), on /v2 and /v1 alike."""
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    body = json.dumps({"inputs": [bytes_input(image_bytes(4))], "parameters": {"top_k": 2}}).encode()
    plain = answer(http.post("/v2/models/pets/infer", content=body, headers={"content-type": "application/json"}))
    headers = {"content-type": "application/json", "content-encoding": encoding}
    assert answer(http.post("/v2/models/pets/infer", content=compress(body), headers=headers)) == plain
    v1 = json.dumps({"images": [base64.b64encode(image_bytes(4)).decode()]}).encode()
    assert answer(http.post("/v1/tasks/pets/classify?top_k=2", content=compress(v1), headers=headers))["results"]


def test_a_compressed_body_is_bounded_by_its_inflated_size(http):
    """A 70 KB gzip of 70 MB (past the 64 MB request limit) is a 413 as soon as it inflates past it;
    corrupt, truncated or unknown encodings are 4xx; the connection serves the next request."""
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    bomb = gzip.compress(b" " * (70 * 2**20))
    assert len(bomb) < 100_000
    refused = http.post("/v2/models/pets/infer", content=bomb, headers=headers)
    assert "inflates past 67108864 bytes (--max-request-mb)" in answer(refused, 413)["error"]
    valid = gzip.compress(json.dumps({"inputs": [bytes_input(image_bytes(0))]}).encode())
    for body, encoding, status, complaint in [
        (b"not gzip at all", "gzip", 400, "not valid gzip"),
        (valid[: len(valid) // 2], "gzip", 400, "truncated"),
        (valid + b"extra", "gzip", 400, "after its gzip stream"),
        (valid, "br", 415, "gzip, deflate or identity"),
    ]:
        response = http.post("/v2/models/pets/infer", content=body, headers={**headers, "content-encoding": encoding})
        assert complaint in answer(response, status)["error"]
    assert answer(http.post("/v2/models/pets/infer", content=valid, headers=headers))["model_name"] == "pets"


def test_the_decoder_inflates_a_body_however_it_is_cut():
    """Any chunking, and output that fills a decompression slice exactly, inflate to the same bytes."""
    import asyncio

    from monaserve.server.content_encoding import SLICE, body_decoder

    data = np.random.default_rng(0).integers(0, 4, 3 * SLICE, dtype=np.uint8).tobytes()
    compressed = gzip.compress(data)

    async def inflate(step: int, limit: int) -> bytes:
        decoder = body_decoder(b"gzip", limit)
        pieces = [compressed[i : i + step] for i in range(0, len(compressed), step)]
        return b"".join([await decoder.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)])

    for step in (7, 4096, len(compressed)):
        assert asyncio.run(inflate(step, len(data))) == data
    assert body_decoder(b"identity", 10) is None and body_decoder(None, 10) is None


def test_every_inference_request_is_counted_under_its_kind_and_protocol(http):
    """Answers refused before inference (a body too large by its Content-Length, a path that does not
    validate, JSON that does not parse) count as well, each under the task's kind and its protocol."""

    def counts() -> dict[tuple[str, str], float]:
        return {
            (sample.labels["protocol"], sample.labels["status"]): sample.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for sample in family.samples
            if sample.name == "monaserve_requests_total" and sample.labels["task"] == "boxes" and sample.labels["kind"] == "detect"
        }

    before = counts()
    image = {"inputs": [bytes_input(image_bytes(0))]}
    assert http.post("/v2/models/boxes/infer", json=image).status_code == 200
    assert http.post("/v2/models/boxes/versions/1/infer", json=image).status_code == 200
    assert http.post("/v2/models/boxes/versions/x/infer", json=image).status_code == 422
    assert http.post("/v2/models/boxes/infer", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert http.post("/v2/models/boxes/infer", content=b"x" * (65 * 2**20)).status_code == 413
    assert http.post("/v1/tasks/boxes/detect", files={"image": ("x", image_bytes(0))}).status_code == 200
    assert http.post("/v2/models/nobody/infer", json=image).status_code == 404  # a made-up name counts nowhere
    after = counts()
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert moved == {("v2", "200"): 2, ("v2", "422"): 1, ("v2", "400"): 1, ("v2", "413"): 1, ("v1", "200"): 1}


def test_statistics_move_by_exactly_the_requests_sent(http):
    """Triton's statistics extension: per version, successes and failures (those that reached a version),
    images, engine batches and the time of each stage."""

    def stats() -> dict:
        (model,) = answer(http.get("/v2/models/masks/versions/1/stats"))["model_stats"]
        return model

    before, started_ms = stats(), time.time() * 1000
    image = bytes_input(image_bytes(0))
    assert http.post("/v2/models/masks/infer", json={"inputs": [image]}).status_code == 200
    assert http.post("/v2/models/masks/infer", json={"inputs": [bytes_input(image_bytes(1), image_bytes(2))]}).status_code == 200
    assert http.post("/v2/models/masks/infer", json={"inputs": [image], "outputs": [{"name": "boxes"}]}).status_code == 400
    assert http.post("/v2/models/masks/infer", content=b"{").status_code == 400  # never reached a version: not counted
    after = stats()
    moved = {key: after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"] for key in after["inference_stats"]}
    assert moved == {
        "success": 2,
        "fail": 1,
        "queue": 2,
        "compute_input": 2,
        "compute_infer": 2,
        "compute_output": 2,
        "cache_hit": 0,
        "cache_miss": 0,
    }
    assert after["inference_count"] - before["inference_count"] == 3
    executions = after["execution_count"] - before["execution_count"]
    assert 1 <= executions <= 3
    assert (
        sum(b["compute_infer"]["count"] for b in after["batch_stats"]) - sum(b["compute_infer"]["count"] for b in before["batch_stats"])
        == executions
    )
    for key in ("success", "compute_infer"):
        assert after["inference_stats"][key]["ns"] > before["inference_stats"][key]["ns"]
    assert after["last_inference"] >= started_ms - 1
    assert (after["name"], after["version"]) == ("masks", "1")


def test_statistics_cover_the_ready_versions(server, http):
    everything = answer(http.get("/v2/models/stats"))["model_stats"]
    assert [(m["name"], m["version"]) for m in everything] == [("boxes", "1"), ("masks", "1"), ("pets", "1"), ("pets", "2")]
    assert [m["version"] for m in answer(http.get("/v2/models/pets/stats"))["model_stats"]] == ["1", "2"]
    assert http.get("/v2/models/nope/stats").status_code == 404
    http.post("/v2/repository/models/boxes/unload", headers=ADMIN).raise_for_status()
    try:
        assert [m["name"] for m in answer(http.get("/v2/models/stats"))["model_stats"]] == ["masks", "pets", "pets"]
        assert "unloaded" in answer(http.get("/v2/models/boxes/stats"), 404)["error"]
    finally:
        http.post("/v2/repository/models/boxes/load", headers=ADMIN).raise_for_status()


def test_model_configuration_describes_the_model_as_triton_does(http):
    config = answer(http.get("/v2/models/pets/config"))
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("pets", "monaserve", 0)
    assert config["input"] == [{"name": "image", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("scores", "TYPE_FP32", [-1, -1]),
        ("labels", "TYPE_STRING", [-1, -1]),
        ("indices", "TYPE_INT64", [-1, -1]),
    ]
    assert config["parameters"]["kind"] == {"string_value": "classify"} and config["parameters"]["version"] == {"string_value": "2"}
    assert answer(http.get("/v2/models/pets/versions/1/config"))["parameters"]["version"] == {"string_value": "1"}
    assert http.get("/v2/models/nope/config").status_code == 404


def test_the_openapi_document_types_every_v2_body(http):
    """A generated client gets typed models: every /v2 body is a component, and real answers validate against them."""
    from monaserve.server import oip_schemas

    document = http.get("/openapi.json").json()
    schemas, paths = document["components"]["schemas"], document["paths"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InferenceRequest"}
    assert infer["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InferenceResponse"}
    assert schemas["InferenceRequest"]["properties"]["inputs"]["items"] == {"$ref": "#/components/schemas/RequestInput"}
    assert {"name", "shape", "datatype", "parameters", "data"} == set(schemas["RequestInput"]["properties"])
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= set(schemas), refs - set(schemas)
    image = bytes_input(image_bytes(0))
    for route, path, model in [
        ("/v2", "/v2", oip_schemas.ServerMetadata),
        ("/v2/models/{name}", "/v2/models/pets", oip_schemas.ModelMetadata),
        ("/v2/models/{name}/config", "/v2/models/pets/config", oip_schemas.ModelConfig),
        ("/v2/models/stats", "/v2/models/stats", oip_schemas.ModelStatisticsResponse),
    ]:
        assert "$ref" in json.dumps(paths[route]["get"]["responses"]["200"]), route
        model.model_validate(answer(http.get(path)))
    oip_schemas.InferenceResponse.model_validate(answer(http.post("/v2/models/boxes/infer", json={"inputs": [image]})))
    oip_schemas.InferenceRequest.model_validate({"inputs": [image], "parameters": {"top_k": 2}})


def test_the_total_time_includes_building_the_answer(http):
    """A 3000x2000 segment answer: its mask is resized to the image and encoded as PNG after the batch,
    and `total_ms` counts that too (before, it stopped at the batch: decode + queue + inference)."""
    image = image_bytes(2, size=(3000, 2000))
    segment = {"content": image, "headers": {"content-type": "image/jpeg"}}
    answer(http.post("/v1/tasks/masks/segment", **segment))  # the adapter is in its slot: no load inside the figures
    timings = answer(http.post("/v1/tasks/masks/segment", **segment))["timings_ms"]
    assert timings["total_ms"] - (timings["decode_ms"] + timings["queue_ms"] + timings["inference_ms"]) > 20, timings
