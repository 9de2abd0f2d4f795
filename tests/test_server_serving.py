"""Serving under concurrency on a real server: mixed batches, hot-loading, eviction, backpressure,
timeouts, preloading, the drain on SIGTERM, and memory under repeated hot-loads."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from monaserve.adapters import InputSpec

from helpers import random_package
from server_harness import TOKEN, ServerProcess, image_bytes

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("front_ends")]
both_ways = pytest.mark.both_ways
"""On the tests whose path crosses the front ends (batches, hot loads, back-pressure, timeouts, drains);
the others exercise the engine process's own logic, the same either way (MONASERVE_TEST_FRONT_ENDS=all
runs them both ways too)."""


def make_store(root, backbone, names, labels=4):
    packages = {}
    for i, name in enumerate(names):
        packages[name] = random_package(backbone, name, seed=100 + i, num_labels=labels)
        packages[name].save(root / name / "1.safetensors")
    return packages


def classify(client: httpx.Client, task: str, images: list[bytes], **params) -> httpx.Response:
    return client.post(f"/v1/tasks/{task}/classify", files=[("image", (f"{i}", d)) for i, d in enumerate(images)], params=params)


def scores(response: httpx.Response) -> list[dict[int, float]]:
    return [{item["index"]: item["score"] for item in result["top"]} for result in response.json()["results"]]


def assert_same_scores(a: list[dict[int, float]], b: list[dict[int, float]], tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(abs(x[k] - y[k]) < tol for k in x)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


@pytest.mark.slow
@both_ways
def test_mixed_task_batches_equal_single_requests(tmp_path, tiny_weights, shared_backbone):
    tasks = ["a", "b", "c"]
    make_store(tmp_path / "store", shared_backbone, tasks)
    requests = [(tasks[i % 3], [image_bytes(i), image_bytes(50 + i)]) for i in range(9)]
    args = ("--max-delay-ms", "300", "--max-batch", "32")
    with ServerProcess(tiny_weights, tmp_path / "store", *args, log=tmp_path / "log") as server:
        with server.client() as client, ThreadPoolExecutor(9) as pool:
            together = list(pool.map(lambda r: classify(client, *r, top_k=4), requests))
            text = client.get("/metrics").text
            alone = [classify(client, task, images, top_k=4) for task, images in requests]
    assert all(r.status_code == 200 for r in together + alone)
    assert metric(text, "monaserve_batch_tasks_sum") > metric(text, "monaserve_batch_tasks_count")  # a batch mixed tasks
    for mixed, single in zip(together, alone):
        assert_same_scores(scores(mixed), scores(single))


@both_ways
def test_hot_load_under_load_loses_nothing_and_never_mixes_versions(tmp_path, tiny_weights, shared_backbone):
    make_store(tmp_path / "store", shared_backbone, ["swap"])
    v2 = random_package(shared_backbone, "swap", seed=999, num_labels=4, version=2)
    images = [image_bytes(7), image_bytes(8)]
    log: list[tuple[float, httpx.Response]] = []
    stop = threading.Event()
    with ServerProcess(tiny_weights, tmp_path / "store", "--admin-token", TOKEN, log=tmp_path / "log") as server:

        def loop() -> None:
            with server.client(token=None) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    log.append((started, classify(client, "swap", images)))

        with server.client() as admin, ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(loop) for _ in range(4)]
            time.sleep(1.0)
            bad = admin.put("/v1/adapters/swap", content=v2.to_bytes()[:-10])
            time.sleep(0.5)
            upload = admin.put("/v1/adapters/swap", content=v2.to_bytes())
            switched = time.monotonic()
            deadline = switched + 60  # until four requests that started after the switch have answered, however loaded the machine
            while sum(started > switched for started, _ in log) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            stop.set()
            for worker in workers:
                worker.result()
            expected = {v: scores(classify(admin, "swap", images, version=v)) for v in (1, 2)}
    assert bad.status_code == 422
    assert upload.status_code == 201, upload.text
    assert log and all(r.status_code == 200 for _, r in log), [r.text for _, r in log if r.status_code != 200][:3]
    versions = [r.json()["version"] for _, r in log]
    assert set(versions) == {1, 2}
    for started, response in log:
        version = response.json()["version"]
        if started > switched:
            assert version == 2
        assert_same_scores(scores(response), expected[version])  # both images of a request from one version


@pytest.mark.slow
def test_eviction_with_two_slots_and_four_tasks(tmp_path, tiny_weights, shared_backbone):
    tasks = ["t0", "t1", "t2", "t3"]
    make_store(tmp_path / "store", shared_backbone, tasks)
    images = [image_bytes(3)]
    with (
        ServerProcess(tiny_weights, tmp_path / "store", "--gpu-slots", "2", log=tmp_path / "few") as few,
        ServerProcess(tiny_weights, tmp_path / "store", "--gpu-slots", "8", log=tmp_path / "many") as many,
    ):
        with many.client() as client:
            expected = {t: scores(classify(client, t, images)) for t in tasks}
        with few.client() as client:
            for _ in range(2):
                for task in tasks:
                    response = classify(client, task, images)
                    assert response.status_code == 200
                    assert_same_scores(scores(response), expected[task])
            with ThreadPoolExecutor(4) as pool:
                concurrent = list(pool.map(lambda t: (t, classify(client, t, images)), tasks * 3))
            text = client.get("/metrics").text
    for task, response in concurrent:
        assert response.status_code == 200, response.text
        assert_same_scores(scores(response), expected[task])
    assert sum(float(v) for v in re.findall(r'^monaserve_adapter_evictions_total\{task="t\d"\} (\S+)$', text, re.M)) >= 6
    assert metric(text, "monaserve_adapter_slots_used") == 2


@both_ways
def test_backpressure_gives_503_with_retry_after(tmp_path, tiny_weights, shared_backbone):
    make_store(tmp_path / "store", shared_backbone, ["busy"])
    args = ("--max-queue", "4", "--max-batch", "1", "--max-delay-ms", "0")
    with ServerProcess(tiny_weights, tmp_path / "store", *args, log=tmp_path / "log") as server:
        with server.client() as client, ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda i: classify(client, "busy", [image_bytes(i)] * 4), range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"] == "overloaded"


@both_ways
def test_request_timeout_gives_504_and_the_server_recovers(tmp_path, tiny_weights, shared_backbone):
    make_store(tmp_path / "store", shared_backbone, ["slow"])
    args = ("--request-timeout-s", "2", "--max-batch", "2")
    with ServerProcess(tiny_weights, tmp_path / "store", *args, log=tmp_path / "log") as server:
        with server.client() as client:
            started = time.monotonic()
            response = classify(client, "slow", [image_bytes(i) for i in range(48)])
            assert response.status_code == 504 and response.json()["error"] == "timeout"
            assert time.monotonic() - started < 10
            deadline = time.monotonic() + 30
            while (after := classify(client, "slow", [image_bytes(1)])).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert after.status_code == 200


def test_preload_all(tmp_path, tiny_weights, shared_backbone):
    make_store(tmp_path / "store", shared_backbone, ["p1", "p2", "p3"])
    args = ("--preload", "all", "--insecure-admin")
    with ServerProcess(tiny_weights, tmp_path / "store", *args, log=tmp_path / "log") as server, server.client() as client:
        listing = client.get("/v1/adapters").json()
    assert [v["location"] for t in listing["tasks"] for v in t["versions"]] == ["slot"] * 3


def test_gpu_byte_budget_refuses_an_adapter_that_cannot_fit(tmp_path, tiny_weights, shared_backbone):
    make_store(tmp_path / "store", shared_backbone, ["big"])
    with ServerProcess(tiny_weights, tmp_path / "store", "--gpu-adapter-mb", "1", log=tmp_path / "log") as server:
        with server.client() as client:
            response = classify(client, "big", [image_bytes(0)])
    assert response.status_code == 507 and "the adapter budget is 1.0 MiB" in response.json()["message"]


@both_ways
def test_sigterm_drains_in_flight_requests(tmp_path, tiny_weights, shared_backbone):
    """HTTP and gRPC alike: readiness false at once, calls in flight and during the drain delay answered."""
    import grpc

    from monaserve.server.oip_proto import grpc_service_pb2 as pb
    from monaserve.server.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub

    make_store(tmp_path / "store", shared_backbone, ["drain"])
    server = ServerProcess(tiny_weights, tmp_path / "store", "--drain-delay-s", "1.5", "--max-batch", "4", log=tmp_path / "log")
    server.wait_ready()
    images = [image_bytes(i) for i in range(8)]
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[8])
    tensor.contents.bytes_contents.extend(images)
    try:
        with server.client() as client, ThreadPoolExecutor(4) as pool, grpc.insecure_channel(server.grpc_target) as channel:
            stub = GRPCInferenceServiceStub(channel)
            classify(client, "drain", [image_bytes(0)])  # adapter loaded before the clock starts
            in_flight = [pool.submit(classify, client, "drain", images) for _ in range(3)]
            grpc_in_flight = pool.submit(stub.ModelInfer, pb.ModelInferRequest(model_name="drain", inputs=[tensor]), timeout=60)
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            readiness = client.get("/health/ready")
            grpc_readiness = stub.ServerReady(pb.ServerReadyRequest()).ready
            during_delay = classify(client, "drain", [image_bytes(1)])
            results = [f.result() for f in in_flight]
            grpc_answer = grpc_in_flight.result()
        assert readiness.status_code == 503 and readiness.json()["status"] == "draining" and grpc_readiness is False
        assert during_delay.status_code == 200  # traffic still routed here during the drain delay is served
        assert all(r.status_code == 200 for r in results), [r.text for r in results]
        assert [list(o.shape) for o in grpc_answer.outputs] == [[8, 4]] * 3
        assert server.process.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/health/live", timeout=2)
    finally:
        server.stop()


def test_a_backbone_that_cannot_load_stops_the_server_with_exit_1(tmp_path):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"\0" * 64)
    server = ServerProcess(weights, tmp_path / "store", log=tmp_path / "log")
    assert server.process.wait(120) == 1
    server.stop()
    assert "start-up failed" in server.log()


@pytest.mark.slow
def test_repeated_uploads_and_requests_do_not_accumulate_memory(tmp_path, tiny_weights, shared_backbone):
    """Hot-load 12 versions with requests between, twice after a warm-up: the second round must not
    hold on to what the first one used (a package kept per upload would add ~65 MiB)."""
    small = InputSpec(size=(32, 32))
    random_package(shared_backbone, "mem", seed=0, num_labels=4, input=small).save(tmp_path / "store" / "mem" / "1.safetensors")
    args = ("--gpu-slots", "4", "--cpu-cache-mb", "16", "--catalog-refresh-s", "0")
    with ServerProcess(tiny_weights, tmp_path / "store", "--admin-token", TOKEN, *args, log=tmp_path / "log") as server:
        with server.client() as client:
            version = 1

            def round_of(uploads: int) -> int:
                nonlocal version
                for _ in range(uploads):
                    version += 1
                    package = random_package(shared_backbone, "mem", seed=version, num_labels=4, version=version, input=small)
                    assert client.put("/v1/adapters/mem", content=package.to_bytes()).status_code == 201
                    for i in range(3):
                        assert classify(client, "mem", [image_bytes(i, size=(48, 40))]).json()["version"] == version
                return server.rss_bytes()

            round_of(6)  # warm-up: caches, slots and allocator pools reach their working size
            first, second = round_of(12), round_of(12)
    grown = (second - first) / 2**20
    print(f"memory: RSS {first / 2**20:.0f} MiB after round 1, {second / 2**20:.0f} MiB after round 2 ({grown:+.1f} MiB)")
    assert grown < 32, f"RSS grew by {grown:.1f} MiB over 12 more uploads and 36 requests"
