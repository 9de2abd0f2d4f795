"""Three replicas on one store behind nginx (deploy/nginx/nginx.conf), on loopback: propagation, failover, rejoin."""

from __future__ import annotations

import json
import signal
import struct
import threading
import time
from collections import Counter

import grpc
import httpx
import pytest

from monaserve.adapters import InputSpec
from monaserve.server.oip_proto import grpc_service_pb2 as pb
from monaserve.server.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from monaserve.testing import FAULTS

from deploy_harness import REPLICA_HEADER, Nginx, RequestLoops, wait_for
from helpers import random_package
from server_harness import TOKEN, ServerProcess, free_port, image_bytes

REFRESH_S = 1.0
JPEG = {"content-type": "image/jpeg"}
pytestmark = [pytest.mark.process, pytest.mark.nginx, pytest.mark.usefixtures("front_ends")]


def test_three_replicas_behind_nginx(tmp_path, tiny_weights, shared_backbone):
    image = image_bytes(0, size=(96, 96))
    ports = [free_port() for _ in range(3)]

    def replica(i: int) -> ServerProcess:
        return ServerProcess(
            tiny_weights,
            tmp_path / "store",
            "--catalog-refresh-s",
            str(REFRESH_S),
            "--replica-id",
            f"replica-{i}",
            "--max-batch",
            "4",
            env={"MONASERVE_ADMIN_TOKEN": TOKEN},
            log=tmp_path / f"replica-{i}.log",
            port=ports[i],
        )

    replicas = [replica(i) for i in range(3)]
    figures: dict[str, object] = {}
    try:
        for server in replicas:
            server.wait_ready(180)
        (tmp_path / "nginx").mkdir()
        with (
            Nginx(ports, tmp_path / "nginx", free_port(), grpc_ports=[r.grpc_port for r in replicas]) as nginx,
            httpx.Client(base_url=nginx.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as gateway,
        ):
            tasks = [f"task-{i}" for i in range(6)]
            for i, task in enumerate(tasks):
                gateway.put(f"/v1/adapters/{task}", content=random_package(shared_backbone, task, seed=i).to_bytes()).raise_for_status()

            # every replica serves what was uploaded through any of them, and says who it is
            for i, server in enumerate(replicas):
                with server.client() as direct:
                    response = direct.post("/v1/tasks/task-0/classify", content=image, headers=JPEG)
                    assert response.status_code == 200 and response.json()["version"] == 1
                    assert response.headers[REPLICA_HEADER] == f"replica-{i}"

            # gRPC through nginx's HTTP/2 listener reaches a replica and answers as REST does
            with grpc.insecure_channel(nginx.grpc_target) as channel:
                tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
                request = pb.ModelInferRequest(
                    model_name="task-0", inputs=[tensor], raw_input_contents=[struct.pack("<I", len(image)) + image]
                )
                answer = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            assert answer.model_version == "1" and [o.name for o in answer.outputs] == ["scores", "labels", "indices"]

            # a new version reaches every replica within the refresh period
            started = time.monotonic()
            gateway.put(
                "/v1/adapters/task-0", content=random_package(shared_backbone, "task-0", seed=9, version=2).to_bytes()
            ).raise_for_status()
            propagation = []
            for server in replicas:
                with server.client() as direct:
                    wait_for(
                        lambda: direct.post("/v1/tasks/task-0/classify", content=image, headers=JPEG).json()["version"] == 2,
                        10 * REFRESH_S,
                        "every replica serves v2",
                    )
                propagation.append(time.monotonic() - started)
            figures["propagation_s"] = round(max(propagation), 2)

            # which replica takes the most traffic (affinity hashes each task to one replica)
            by_replica = Counter(
                gateway.post(f"/v1/tasks/{task}/classify", content=image, headers=JPEG).headers[REPLICA_HEADER] for task in tasks
            )
            victim = int(by_replica.most_common(1)[0][0].rsplit("-", 1)[1])

            # a request loop through nginx while that replica is killed: nothing is lost
            with RequestLoops(nginx.url, tasks, image) as load:
                time.sleep(3)
                replicas[victim].process.send_signal(signal.SIGKILL)
                replicas[victim].process.wait()
                killed_at = load.sent
                time.sleep(6)
            figures |= {
                "requests": load.sent,
                "sent_after_kill": load.sent - killed_at,
                "failed": load.failed,
                "served_by": dict(load.served_by),
            }
            assert load.statuses.keys() == {200}, f"lost requests: {dict(load.statuses)}"

            # the killed replica comes back and rejoins: nginx sends its tasks to it again
            replicas[victim].stop()
            replicas[victim] = replica(victim).wait_ready(180)
            rejoin = wait_for(
                lambda: any(
                    gateway.post(f"/v1/tasks/{task}/classify", content=image, headers=JPEG).headers[REPLICA_HEADER] == f"replica-{victim}"
                    for task in tasks
                ),
                60,
                "the restarted replica serves through nginx again",
            )
            figures["rejoin_s"] = round(rejoin, 1)
    finally:
        for server in replicas:
            server.stop()
    print("topology:", json.dumps(figures))


def test_internal_errors_at_20_per_second_cost_other_clients_nothing_through_nginx(tmp_path, tiny_weights, shared_backbone):
    """Two replicas whose OIP request parsing raises (patched in their processes by the tests' launcher)
    behind nginx: an attacker provokes a 500 twenty times a second for 20 s while 4 clients send valid
    /v1 requests. Each 500 leaves its connection usable, so nginx never sees a reset, never marks a
    replica failed, and the 4 clients get no 502 (before this, nearly all of theirs were)."""
    store = tmp_path / "store"
    for i in range(4):
        random_package(shared_backbone, f"cls-{i}", seed=i, input=InputSpec(size=(64, 64))).save(store / f"cls-{i}" / "1.safetensors")
    launcher = [*FAULTS, "monaserve.server.oip:parse_request"]
    ports = [free_port(), free_port()]
    replicas = [
        ServerProcess(
            tiny_weights,
            store,
            "--replica-id",
            f"replica-{i}",
            env={"MONASERVE_ADMIN_TOKEN": TOKEN},
            log=tmp_path / f"replica-{i}.log",
            port=ports[i],
            launcher=launcher,
        )
        for i in range(2)
    ]
    image = image_bytes(0, size=(64, 64))
    try:
        for server in replicas:
            server.wait_ready(180)
        (tmp_path / "nginx").mkdir()
        with Nginx(ports, tmp_path / "nginx", free_port()) as nginx:
            stop = threading.Event()
            normal: Counter[int] = Counter()
            attack: Counter[int] = Counter()
            lock = threading.Lock()

            def valid_requests(k: int) -> None:
                with httpx.Client(base_url=nginx.url, timeout=60) as client:
                    i = k
                    while not stop.is_set():
                        if i % 4 == k:  # mostly cheap calls, so nginx reuses each pooled connection at once
                            status = client.post(f"/v1/tasks/cls-{i % 4}/classify", content=image, headers=JPEG).status_code
                        else:
                            status = client.get(f"/v1/tasks/cls-{i % 4}").status_code
                        i += 1
                        with lock:
                            normal[status] += 1

            def attacker() -> None:
                with httpx.Client(base_url=nginx.url, timeout=60) as client:
                    i, next_at = 0, time.monotonic()
                    while not stop.is_set():
                        status = client.post(f"/v2/models/cls-{i % 4}/infer", json={"inputs": []}).status_code
                        attack[status] += 1
                        i += 1
                        next_at += 1 / 20
                        stop.wait(max(0.0, next_at - time.monotonic()))

            threads = [threading.Thread(target=valid_requests, args=(k,)) for k in range(4)] + [threading.Thread(target=attacker)]
            for thread in threads:
                thread.start()
            time.sleep(20)
            stop.set()
            for thread in threads:
                thread.join(120)
            upstream_errors = (tmp_path / "nginx" / "error.log").read_text().count("upstream")
        print(f"fleet: attack {dict(attack)}, normal {dict(normal)}, nginx upstream errors {upstream_errors}")
        assert attack.keys() == {500} and sum(attack.values()) >= 350
        assert normal.keys() == {200} and sum(normal.values()) > 0
        assert upstream_errors == 0
    finally:
        for server in replicas:
            server.stop()
