"""The Python client and the `predict`/`adapters` verbs against a real server (retries against a scripted one)."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from monaserve.client import (
    AsyncMonaClient,
    Classification,
    Detections,
    MonaClient,
    MonaConnectionError,
    MonaServerError,
    RetryPolicy,
    Segmentation,
)

from helpers import random_package
from server_harness import MONASERVE, TOKEN, free_port, image_bytes, serve_tasks

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    with serve_tasks(
        tmp_path_factory, tiny_weights, shared_backbone, {"pets": "classify", "boxes": "detect", "masks": "segment"}
    ) as server:
        yield server


@pytest.fixture
def client(server):
    with MonaClient(server.url, token=TOKEN) as client:
        yield client


def test_the_client_imports_no_torch():
    code = "import sys, monaserve.client, monaserve.client.cli, monaserve.client.draw; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_classify_takes_paths_bytes_pil_images_and_arrays(client, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes(1, fmt="PNG"))
    single = client.classify("pets", path, top_k=3)
    assert isinstance(single, Classification) and single.version == 1 and single.task == "pets"
    assert single.timings_ms.keys() == {"decode_ms", "queue_ms", "inference_ms", "total_ms"} and single.timings_ms["total_ms"] > 0
    assert len(single.labels) == 3 and single.top(2) == single.labels[:2] and single.best == single.labels[0]
    assert [label.score for label in single.labels] == sorted((label.score for label in single.labels), reverse=True)
    pil = Image.open(io.BytesIO(image_bytes(1, fmt="PNG")))
    array = np.asarray(pil)
    batch = client.classify("pets", [path, path.read_bytes(), pil, array], top_k=3)
    assert len(batch) == 4  # one lossless image, four ways: the same answer (to batching's float rounding)
    for result in batch:
        assert [label.label for label in result.labels] == [label.label for label in single.labels]
        assert [label.score for label in result.labels] == pytest.approx([label.score for label in single.labels], abs=1e-4)


def test_detect_and_segment_results_as_numpy(client):
    detections = client.detect("boxes", image_bytes(2, size=(200, 150)), min_score=0.0)
    assert isinstance(detections, Detections) and (detections.width, detections.height) == (200, 150)
    assert detections.boxes.shape == (len(detections.detections), 4) and detections.boxes.dtype == np.float32
    assert detections.scores.shape == (len(detections.detections),) and len(detections.labels) == len(detections.detections)
    segmentation = client.predict("masks", image_bytes(3, size=(120, 90)))  # kind from the task
    assert isinstance(segmentation, Segmentation)
    assert segmentation.mask.shape == (90, 120) and segmentation.mask.dtype == np.uint8
    assert sum(c.pixels for c in segmentation.classes) == 120 * 90
    for area in segmentation.classes:
        assert (segmentation.mask == area.index).sum() == area.pixels


def test_errors_carry_the_servers_code_and_message(client, server):
    with pytest.raises(MonaServerError) as unknown:
        client.classify("nope", image_bytes(0))
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_task") and "nope" in unknown.value.message
    with pytest.raises(MonaServerError) as wrong:
        client.detect("pets", image_bytes(0))
    assert wrong.value.status == 409 and "classify" in wrong.value.message
    with MonaClient(server.url) as anonymous, pytest.raises(MonaServerError) as denied:
        anonymous.list()
    assert denied.value.status in (401, 403)


def test_adapter_management(client, shared_backbone):
    entry = client.upload(random_package(shared_backbone, "pets", seed=7, version=5, num_labels=4).to_bytes())
    assert entry["serving_version"] == entry["version"] == 2  # the task's next, whatever the package was trained as
    assert client.classify("pets", image_bytes(0)).version == 2
    listed = {task["name"]: task for task in client.list()["tasks"]}
    assert [v["version"] for v in listed["pets"]["versions"]] == [1, 2]
    assert client.load("pets", version=1)["serving_version"] == 1
    assert client.unload("pets") == {"task": "pets", "unloaded": True, "purged": False}
    with pytest.raises(MonaServerError, match="task_unloaded"):
        client.classify("pets", image_bytes(0))
    client.load("pets", version=2)
    assert {t["name"] for t in client.tasks()} == {"pets", "boxes", "masks"}


def test_async_client(server):
    async def scenario():
        async with AsyncMonaClient(server.url, token=TOKEN) as client:
            results = await asyncio.gather(*(client.classify("pets", image_bytes(i)) for i in range(4)))
            assert all(isinstance(r, Classification) for r in results)
            assert (await client.task("masks"))["kind"] == "segment"
            assert isinstance(await client.predict("boxes", image_bytes(0), min_score=0.0), Detections)
            with pytest.raises(MonaServerError, match="unknown_task"):
                await client.segment("nope", image_bytes(0))

    asyncio.run(scenario())


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers 503 with Retry-After to the first `busy` requests, then a classify result.

    The real server's 503 needs a full queue at the right instant; this makes the sequence exact.
    """

    busy = 2
    seen: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        Scripted.seen.append(time.monotonic())
        if len(Scripted.seen) <= Scripted.busy:
            body, status, extra = {"error": "overloaded", "message": "queue full"}, 503, {"Retry-After": "0.3"}
        else:
            body, status, extra = {"task": "t", "kind": "classify", "version": 3, "results": [{"top": []}]}, 200, {}
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", "content-length": str(len(data)), **extra}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted():
    Scripted.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_503_is_retried_after_retry_after(scripted):
    with MonaClient(scripted, retry=RetryPolicy(attempts=3)) as client:
        assert client.classify("t", image_bytes(0)).version == 3
    gaps = np.diff(Scripted.seen)
    assert len(Scripted.seen) == 3 and (gaps >= 0.29).all()


def test_retries_end_with_the_last_error(scripted):
    with MonaClient(scripted, retry=RetryPolicy(attempts=2)) as client, pytest.raises(MonaServerError) as error:
        client.classify("t", image_bytes(0))
    assert (error.value.status, error.value.code, error.value.retry_after_s) == (503, "overloaded", 0.3)


def test_connection_errors_are_retried_then_raised():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with MonaClient(url, retry=RetryPolicy(attempts=3, backoff_s=0.05)) as client, pytest.raises(MonaConnectionError):
        client.classify("t", image_bytes(0))


def run_cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {**os.environ, "MONASERVE_TOKEN": token or ""}
    return subprocess.run([MONASERVE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_predict_prints_draws_and_reports_errors(server, tmp_path):
    image = tmp_path / "street.jpg"
    image.write_bytes(image_bytes(5, size=(160, 120)))
    human = run_cli("predict", "pets", str(image), "--url", server.url)
    assert human.returncode == 0 and human.stdout.startswith(f"{image}: pets-class-") and "(v" in human.stdout
    as_json = run_cli("predict", "boxes", str(image), str(image), "--url", server.url, "--json", "--min-score", "0")
    (body,) = [json.loads(line) for line in as_json.stdout.splitlines()]  # the server's answer, as it sent it
    assert body.keys() == {"task", "kind", "version", "results", "timings_ms"} and body["kind"] == "detect"
    assert len(body["results"]) == 2 and body["results"][0]["width"] == 160 and body["results"][0]["detections"]
    assert body["timings_ms"]["total_ms"] >= body["timings_ms"]["inference_ms"] > 0
    drawn = tmp_path / "drawn.png"
    run_cli("predict", "masks", str(image), "--url", server.url, "--draw", str(drawn)).check_returncode()
    assert Image.open(drawn).size == (160, 120)
    assert np.asarray(Image.open(drawn).convert("RGB")).tolist() != np.asarray(Image.open(image).convert("RGB")).tolist()
    missing = run_cli("predict", "nope", str(image), "--url", server.url)
    assert missing.returncode == 1 and "unknown_task" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_adapters_verbs(server, shared_backbone, tmp_path):
    package = tmp_path / "pets-3.safetensors"
    random_package(shared_backbone, "pets", seed=8, version=3, num_labels=4).save(package)
    uploaded = run_cli("adapters", "upload", str(package), "--url", server.url, "--version", "3")
    assert uploaded.returncode == 0 and "pets: stored as v3; serving v3" in uploaded.stdout, uploaded.stderr
    taken = run_cli("adapters", "upload", str(package), "--url", server.url, "--version", "3")
    assert taken.returncode == 1 and "leave the version out to store this upload as v4" in taken.stderr
    listed = run_cli("adapters", "list", "--url", server.url)
    assert "v3* (cpu slot " in listed.stdout and "slots used" in listed.stdout
    as_json = json.loads(run_cli("adapters", "list", "--url", server.url, "--json").stdout)
    assert {t["name"] for t in as_json["tasks"]} >= {"pets", "boxes", "masks"}
    assert "unloaded" in run_cli("adapters", "unload", "boxes", "--url", server.url).stdout
    assert "serving v1" in run_cli("adapters", "load", "boxes", "--url", server.url).stdout
    denied = run_cli("adapters", "list", "--url", server.url, token=None)
    assert denied.returncode == 1 and "401" in denied.stderr and "--token (or MONASERVE_TOKEN)" in denied.stderr
    wrong = run_cli("adapters", "list", "--url", server.url, token="not-the-token")
    assert wrong.returncode == 1 and "403" in wrong.stderr and "must be the server's admin token" in wrong.stderr


def test_retry_after_values_are_bounded():
    policy = RetryPolicy(max_backoff_s=5)
    assert policy.delay(0, -3) == 0 and policy.delay(0, 60) == 5 and policy.delay(0, 1.5) == 1.5
    assert 0 < policy.delay(1, float("nan")) <= 5  # unusable header: plain backoff


def test_cli_takes_only_url_and_token_from_the_environment(server, tmp_path):
    env = {**os.environ, "MONASERVE_URL": server.url, "MONASERVE_ADMIN_TOKEN": TOKEN, "MONASERVE_PURGE": "1", "MONASERVE_VERSION": "99"}
    env.pop("MONASERVE_TOKEN", None)
    image = tmp_path / "x.jpg"
    image.write_bytes(image_bytes(1))
    predicted = subprocess.run([MONASERVE, "predict", "pets", str(image)], env=env, capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr  # MONASERVE_VERSION does not pin a version
    listed = subprocess.run([MONASERVE, "adapters", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "pets" in listed.stdout  # the admin token is the server's own variable
    missing = subprocess.run([MONASERVE, "predict", "pets", str(tmp_path / "none.jpg")], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "No such file" in missing.stderr and "Traceback" not in missing.stderr
