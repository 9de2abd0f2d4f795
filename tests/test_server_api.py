"""The HTTP API, in process: inference inputs, errors, admin routes, limits and metrics."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib

import pytest
import torch
from PIL import Image

from monaserve.adapters import AdapterPackage, Backbone
from monaserve.server.engine import Engine
from monaserve.server.images import ImageLimits, decode, open_images

from app_harness import InProcessServer
from helpers import TINY, prepare_as_served, random_package
from server_harness import TOKEN, ServerProcess, image_bytes, store_of

TASKS = {"birds": 4, "cars": 6, "dogs": 3}


@pytest.fixture(scope="module")
def packages(shared_backbone) -> dict[str, AdapterPackage]:
    return {name: random_package(shared_backbone, name, seed=i, num_labels=n) for i, (name, n) in enumerate(TASKS.items())}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, packages):
    with InProcessServer(tiny_weights, store_of(tmp_path_factory, packages.values()), admin_token=TOKEN, max_delay_ms=20) as server:
        yield server


@pytest.fixture(scope="module")
def local_engine(tiny_weights, packages) -> Engine:
    """An independent in-process engine with the same backbone and adapters, to check the server against."""
    engine = Engine(Backbone.load(TINY, tiny_weights), num_slots=len(packages))
    for slot, package in enumerate(packages.values()):
        engine.install(slot, package)
    return engine


def expected_probabilities(engine: Engine, packages, task: str, data: bytes) -> torch.Tensor:
    slot = list(packages).index(task)
    image = prepare_as_served(data, packages[task].manifest.input).tensor
    return engine.run(image[None], [slot])[0]  # probabilities: heads stop at the answer in input pixels


def test_health_docs_and_openapi(server):
    with server.client(token=None) as client:
        assert client.get("/health/live").json() == {"status": "alive"}
        assert client.get("/health/ready").json()["status"] == "ready"
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/tasks/{task}/{kind}", "/v1/adapters", "/v1/adapters/{task}", "/v1/adapters/{task}/load"} <= set(paths)


def test_classify_multipart_matches_the_engine(server, packages, local_engine):
    images = [image_bytes(1), image_bytes(2, size=(90, 200), fmt="PNG")]
    with server.client(token=None) as client:
        response = client.post("/v1/tasks/cars/classify?top_k=6", files=[("image", ("a.jpg", images[0])), ("image", ("b.png", images[1]))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task"], body["kind"], body["version"]) == ("cars", "classify", 1)
    assert set(body["timings_ms"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
    assert len(body["results"]) == 2
    for data, result in zip(images, body["results"]):
        expected = expected_probabilities(local_engine, packages, "cars", data)
        scores = {item["index"]: item["score"] for item in result["top"]}
        assert [item["label"] for item in result["top"]][0] == packages["cars"].manifest.labels[int(expected.argmax())]
        assert torch.allclose(torch.tensor([scores[i] for i in range(6)]), expected, atol=1e-4)


def test_jpegs_decoded_on_the_engines_device_answer_as_pillows(tmp_path_factory, tiny_weights, packages, local_engine):
    """--jpeg-decode device (the GPU path, here on the CPU engine): a JPEG and a PNG in one request are
    answered as the Pillow path answers them."""
    images = [image_bytes(4, size=(300, 200)), image_bytes(5, size=(90, 200), fmt="PNG")]
    store = store_of(tmp_path_factory, packages.values())
    with InProcessServer(tiny_weights, store, jpeg_decode="device") as server, server.client(token=None) as client:
        assert server.runtime.decoder.jpeg_device == torch.device("cpu")
        response = client.post("/v1/tasks/cars/classify?top_k=6", files=[("image", ("a.jpg", images[0])), ("image", ("b.png", images[1]))])
    assert response.status_code == 200, response.text
    for data, result in zip(images, response.json()["results"]):
        expected = expected_probabilities(local_engine, packages, "cars", data)
        scores = {item["index"]: item["score"] for item in result["top"]}
        assert torch.allclose(torch.tensor([scores[i] for i in range(6)]), expected, atol=1e-3)


def test_json_base64_and_raw_bodies(server):
    data = image_bytes(3)
    with server.client(token=None) as client:
        by_json = client.post("/v1/tasks/birds/classify", json={"images": [base64.b64encode(data).decode()]})
        by_raw = client.post("/v1/tasks/birds/classify", content=data, headers={"content-type": "image/jpeg"})
        by_form = client.post("/v1/tasks/birds/classify", files={"image": ("x.jpg", data)})
    assert by_json.status_code == by_raw.status_code == by_form.status_code == 200
    tops = [r.json()["results"][0]["top"] for r in (by_json, by_raw, by_form)]
    assert tops[0] == tops[1] == tops[2]
    assert len(tops[0]) == 4  # top_k defaults to 5, capped by the task's 4 labels


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/tasks/unknown/classify", 404, "unknown_task"),
        ("/v1/tasks/birds/detect", 409, "wrong_kind"),
        ("/v1/tasks/birds/segment", 409, "wrong_kind"),
        ("/v1/tasks/Bad%20Name/classify", 422, "invalid_request"),
        ("/v1/tasks/birds/classify?version=7", 404, "unknown_version"),
        ("/v1/tasks/birds/classify?top_k=0", 422, "invalid_request"),
        ("/v1/tasks/birds/classify?version=abc", 422, "invalid_request"),
        ("/v1/tasks/birds/explain", 422, "invalid_request"),
    ],
)
def test_request_errors_are_json_4xx(server, path, status, code):
    with server.client(token=None) as client:
        response = client.post(path, files={"image": ("x.jpg", image_bytes(0))})
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert response.json()["message"]


def test_wrong_kind_message_names_the_right_route(server):
    with server.client(token=None) as client:
        message = client.post("/v1/tasks/dogs/detect", content=image_bytes(0), headers={"content-type": "image/jpeg"}).json()["message"]
    assert message == "task 'dogs' is a classify task; use /v1/tasks/dogs/classify"


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares a huge size over almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


def _sixteen_bit_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((torch.arange(64 * 48).reshape(48, 64) * 20).numpy().astype("uint16")).save(buffer, format="PNG")
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    image = Image.open(io.BytesIO(image_bytes(5, size=(120, 60))))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), color) for color in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def _multi_frame_tiff() -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _zip_appended(image: bytes) -> bytes:
    """A polyglot: a valid image that is also a zip archive (an archive's directory sits at the end)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.sh", "#!/bin/sh\necho pwned\n")
    return image + buffer.getvalue()


BAD_IMAGES = {
    "animated-gif": (_animated_gif(), 415),
    "multi-frame-tiff": (_multi_frame_tiff(), 415),
    "png-magic-jpeg-body": (b"\x89PNG\r\n\x1a\n" + image_bytes(8)[2:], 400),
    "html-with-jpeg-magic": (b"\xff\xd8\xff<html><script>alert(1)</script></html>", 415),
    "empty": (b"", 400),
    "truncated-jpeg": (image_bytes(1)[:300], 400),
    "truncated-png": (image_bytes(1, fmt="PNG")[:200], 400),
    "random-bytes": (bytes(range(256)) * 8, 415),
    "text": (b"hello, this is not an image", 415),
    "gif": (_gif(), 415),
    "bomb": (_png_with_declared_size(100_000, 100_000), 413),
}
GOOD_IMAGES = {
    "16-bit-png": _sixteen_bit_png(),
    "cmyk-jpeg": image_bytes(2, fmt="JPEG", mode="CMYK"),
    "rgba-png": image_bytes(3, fmt="PNG", mode="RGBA"),
    "grey-png": image_bytes(4, fmt="PNG", mode="L"),
    "webp": image_bytes(5, fmt="WEBP"),
    "exif-rotated": _exif_rotated_jpeg(),
    "1x1": image_bytes(6, size=(1, 1), fmt="PNG"),
    "1x3000": image_bytes(7, size=(1, 3000), fmt="PNG"),
    "4000x1": image_bytes(8, size=(4000, 1), fmt="PNG"),
    "png-zip-polyglot": _zip_appended(image_bytes(9, fmt="PNG")),
    "jpeg-with-trailing-html": image_bytes(10) + b"<html><script>alert(1)</script></html>",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_get_a_defined_4xx(server, name):
    data, status = BAD_IMAGES[name]
    with server.client(token=None) as client:
        response = client.post("/v1/tasks/birds/classify", files={"image": ("f", data)})
        assert response.status_code == status, response.text
        assert "image 0" in response.json()["message"]
        assert client.get("/health/ready").status_code == 200


def test_memory_returns_to_baseline_after_bad_images(server):
    """Decoding bombs, truncated and polyglot files over and over leaves no memory behind."""
    with server.client(token=None) as client:

        def send_corpus():
            for data, _ in BAD_IMAGES.values():
                client.post("/v1/tasks/birds/classify", files={"image": ("f", data)})

        send_corpus()  # warm: allocator pools and caches reach their working size
        baseline = server.rss_bytes()
        for _ in range(5):
            send_corpus()
        grown = server.rss_bytes() - baseline
        assert client.get("/health/ready").status_code == 200
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 5 rounds of {len(BAD_IMAGES)} bad images"


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_unusual_but_valid_images_are_classified(server, name):
    with server.client(token=None) as client:
        response = client.post("/v1/tasks/birds/classify", files={"image": ("f", GOOD_IMAGES[name])})
    assert response.status_code == 200, response.text


def test_exif_orientation_is_applied():
    (opened,) = open_images([_exif_rotated_jpeg()], ImageLimits(), (224, 224))
    decoded = decode(opened)
    assert decoded.image.size == (60, 120) and decoded.original_size == (120, 60)


def test_unsupported_content_type_and_bad_json(server):
    with server.client(token=None) as client:
        assert client.post("/v1/tasks/birds/classify", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        bad = client.post("/v1/tasks/birds/classify", json={"images": ["***"]})
        assert (bad.status_code, bad.json()["message"]) == (400, "images[0] is not valid base64")
        assert client.post("/v1/tasks/birds/classify", json={"pictures": []}).status_code == 400
        assert client.post("/v1/tasks/birds/classify", files={"other": ("x", b"1")}).status_code == 400


def test_body_and_image_count_limits(server):
    with server.client(token=None) as client:
        many = [("image", (f"{i}.jpg", b"x")) for i in range(65)]
        response = client.post("/v1/tasks/birds/classify", files=many)
        assert response.status_code == 413 and "limit is 64" in response.json()["message"]
        huge = client.post("/v1/tasks/birds/classify", content=b"\0" * (65 * 2**20), headers={"content-type": "image/jpeg"})
        assert huge.status_code == 413 and huge.json()["error"] == "too_large"


def test_admin_routes_need_the_token(server):
    with server.client(token=None) as anonymous, server.client(token="wrong") as wrong, server.client() as admin:
        for method, path in [
            ("GET", "/v1/adapters"),
            ("GET", "/v1/adapters/birds"),
            ("PUT", "/v1/adapters/birds"),
            ("POST", "/v1/adapters/birds/load"),
            ("DELETE", "/v1/adapters/birds"),
        ]:
            missing = anonymous.request(method, path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert wrong.request(method, path).status_code == 403
        assert admin.get("/v1/adapters").status_code == 200
    assert TOKEN not in server.log()


def test_adapter_listing(server):
    with server.client() as admin, server.client(token=None) as client:
        client.post("/v1/tasks/dogs/classify", files={"image": ("x.jpg", image_bytes(0))})
        listing = admin.get("/v1/adapters").json()
        dogs = admin.get("/v1/adapters/dogs").json()
    names = [t["name"] for t in listing["tasks"]]
    assert {"birds", "cars", "dogs"} <= set(names)
    assert dogs["versions"][0]["location"] == "slot" and dogs["versions"][0]["slot"] is not None
    assert dogs["versions"][0]["device"] == listing["device"]["device"] == "cpu"  # named as it is, on a CPU server too
    assert (dogs["kind"], dogs["labels"], dogs["serving_version"], dogs["input_size"]) == ("classify", 3, 1, [224, 224])
    assert listing["device"]["slots"] == 16 and listing["device"]["slot_bytes"] > 0
    assert listing["device"]["resident_bytes"] >= listing["device"]["slot_bytes"]


def test_upload_validates_before_storing(server, shared_backbone, packages):
    good = random_package(shared_backbone, "flowers", seed=11, num_labels=2)
    other = random_package(Backbone.load(TINY, "random", seed=5), "flowers", seed=11, num_labels=2)
    with server.client() as admin, server.client(token=None) as client:
        refused = [
            (b"not a package", "not a safetensors file"),
            (other.to_bytes(), "trained on other weights"),
            (packages["birds"].to_bytes(), "the package is for task 'birds', not 'flowers'"),
        ]
        for data, message in refused:
            response = admin.put("/v1/adapters/flowers", content=data)
            assert response.status_code == 422 and message in response.json()["message"], response.text
        assert not (server.store / "flowers").exists() or not list((server.store / "flowers").iterdir())
        created = admin.put("/v1/adapters/flowers", content=good.to_bytes())
        assert created.status_code == 201, created.text
        assert created.json()["versions"][0]["location"] == "slot" and created.json()["version"] == 1
        assert (server.store / "flowers" / "1.safetensors").read_bytes() == good.to_bytes()
        again = admin.put("/v1/adapters/flowers?version=1", content=good.to_bytes())
        assert again.status_code == 409 and again.json()["error"] == "version_exists"
        assert "leave the version out to store this upload as v2" in again.json()["message"]
        assert client.post("/v1/tasks/flowers/classify", files={"image": ("x", image_bytes(1))}).status_code == 200


def test_uploads_get_the_next_version_unless_they_ask_for_one(server, shared_backbone):
    """The version a package was trained as does not decide: the server stores the task's next, or the one asked for,
    and writes it into the stored package's manifest (its tensors unchanged)."""
    trained_as_1 = [random_package(shared_backbone, "herbs", seed=seed, num_labels=2) for seed in (31, 32, 33)]
    with server.client() as admin, server.client(token=None) as client:
        answers = [admin.put("/v1/adapters/herbs", content=trained_as_1[0].to_bytes())]
        answers.append(admin.put("/v1/adapters/herbs", content=trained_as_1[1].to_bytes()))
        answers.append(admin.put("/v1/adapters/herbs?version=7", content=trained_as_1[2].to_bytes()))
        assert [(a.status_code, a.json()["version"]) for a in answers] == [(201, 1), (201, 2), (201, 7)]
        assert answers[-1].json()["versions"][-1] == {**answers[-1].json()["versions"][-1], "version": 7, "serving": True}
        for version, package in zip((1, 2, 7), trained_as_1):
            stored = AdapterPackage.read(server.store / "herbs" / f"{version}.safetensors")
            assert stored.manifest == package.manifest.model_copy(update={"version": version})
            assert all(torch.equal(stored.tensors[name], tensor) for name, tensor in package.tensors.items())
        assert admin.put("/v1/adapters/herbs", content=trained_as_1[0].to_bytes()).json()["version"] == 8
        served = client.post("/v1/tasks/herbs/classify?version=2", files={"image": ("x", image_bytes(1))})
        assert served.status_code == 200 and served.json()["version"] == 2
        assert admin.put("/v1/adapters/herbs?version=0", content=trained_as_1[0].to_bytes()).status_code == 422


def test_an_upload_that_is_not_the_package_file_says_how_to_send_it(server, shared_backbone):
    package = random_package(shared_backbone, "roots", seed=41, num_labels=2).to_bytes()
    with server.client() as admin:
        form = admin.put("/v1/adapters/roots", files={"file": ("roots.safetensors", package)})  # curl -F, the usual slip
        assert form.status_code == 415 and "--data-binary @roots.safetensors" in form.json()["message"], form.text
        jpeg = admin.put("/v1/adapters/roots", content=image_bytes(3))
        assert jpeg.status_code == 422 and jpeg.json()["message"].startswith("not a safetensors file: it looks like a JPEG image")
        multipart_as_raw = admin.put("/v1/adapters/roots", content=b"--boundary\r\nContent-Disposition: form-data\r\n\r\n" + package)
        assert "send the file itself, curl --data-binary @FILE" in multipart_as_raw.json()["message"], multipart_as_raw.text
        cut = admin.put("/v1/adapters/roots", content=package[: len(package) // 2])
        assert cut.status_code == 422 and cut.json()["message"].startswith("the package is truncated:"), cut.text
        assert admin.get("/v1/adapters/roots").status_code == 404  # nothing stored


def test_unload_load_and_purge(server, shared_backbone):
    package = random_package(shared_backbone, "temp", seed=21, num_labels=3)
    image = {"image": ("x.jpg", image_bytes(0))}
    with server.client() as admin, server.client(token=None) as client:
        assert admin.put("/v1/adapters/temp", content=package.to_bytes()).status_code == 201
        assert admin.delete("/v1/adapters/temp").json() == {"task": "temp", "unloaded": True, "purged": False}
        gone = client.post("/v1/tasks/temp/classify", files=image)
        assert gone.status_code == 404 and gone.json()["error"] == "task_unloaded"
        pinned = client.post("/v1/tasks/temp/classify?version=9", files=image)  # unloaded is said first
        assert pinned.status_code == 404 and pinned.json()["error"] == "task_unloaded"
        assert admin.get("/v1/adapters/temp").json()["enabled"] is False
        loaded = admin.post("/v1/adapters/temp/load", json={"version": 1})
        assert loaded.status_code == 200 and loaded.json()["versions"][0]["location"] == "slot"
        assert client.post("/v1/tasks/temp/classify", files=image).status_code == 200
        assert admin.post("/v1/adapters/temp/load", json={"version": 9}).status_code == 404
        assert admin.delete("/v1/adapters/temp?purge=true").json()["purged"] is True
        assert not (server.store / "temp").exists()
        assert client.post("/v1/tasks/temp/classify", files=image).json()["error"] == "unknown_task"


def test_adapters_placed_in_the_store_are_found(server, shared_backbone):
    random_package(shared_backbone, "dropped", seed=31, num_labels=2).save(server.store / "dropped" / "1.safetensors")
    (server.store / "dropped" / "2.safetensors").write_bytes(b"corrupt")
    with server.client(token=None) as client:
        response = client.post("/v1/tasks/dropped/classify", files={"image": ("x", image_bytes(1))})
    assert response.status_code == 200 and response.json()["version"] == 1
    assert "skipping dropped/2.safetensors" in server.log()


def test_metrics(server):
    with server.client(token=None) as client:
        client.post("/v1/tasks/birds/classify", files={"image": ("x", image_bytes(1))})
        text = client.get("/metrics").text
    for series in [
        'monaserve_requests_total{kind="classify",protocol="v1",status="200",task="birds"}',
        'monaserve_request_latency_seconds_count{stage="inference",task="birds"}',
        'monaserve_request_latency_seconds_count{stage="queue",task="birds"}',
        "monaserve_batch_size_count",
        "monaserve_batch_tasks_count",
        "monaserve_queue_depth",
        'monaserve_adapter_loads_total{task="birds"}',
        "monaserve_adapter_slots 16.0",
        "monaserve_adapter_slots_used",
        "monaserve_store_errors_total",
        "process_resident_memory_bytes",
    ]:
        assert series in text, series


def test_admin_api_is_off_without_a_token(tmp_path, tiny_weights):
    with InProcessServer(tiny_weights, tmp_path / "store") as server, server.client() as client:
        response = client.get("/v1/adapters")
        assert response.status_code == 403 and "admin API is off" in response.json()["message"]


@pytest.mark.process
def test_env_vars_configure_the_server(tmp_path, tiny_weights):
    env = {"MONASERVE_ADMIN_TOKEN": "from-env", "MONASERVE_GPU_SLOTS": "3"}
    with ServerProcess(tiny_weights, tmp_path / "store", env=env, log=tmp_path / "log") as server:
        with server.client(token="from-env") as client:
            assert client.get("/v1/adapters").json()["device"]["slots"] == 3
