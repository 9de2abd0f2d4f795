"""The image, built from the repository's Dockerfile with podman and run as users run it: one container as
uid 10001 on a read-only root with a store volume, then three replicas and nginx in containers from
deploy/compose.yaml. The images are built once per run, from the start of the run on (conftest.py's
`container_images`, with monaserve.testing.images), and removed after."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest

from monaserve.adapters import Backbone
from monaserve.server.oip_proto import grpc_service_pb2 as pb
from monaserve.server.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from monaserve.testing.images import MONASERVE_IMAGE, NGINX_IMAGE, ROOT, Container, podman

from deploy_harness import REPLICA_HEADER, RequestLoops, wait_for
from helpers import TINY, random_package
from server_harness import TOKEN, free_port, image_bytes

pytestmark = [pytest.mark.container, pytest.mark.process, pytest.mark.usefixtures("container_images")]
JPEG = {"content-type": "image/jpeg"}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
STORE, MODELS = "/var/lib/monaserve/adapters", "/models"
"""The image's declared volumes: with /tmp, the only places it may write on a read-only root."""
DRAIN_DELAY_S = 5.0
"""The image's MONASERVE_DRAIN_DELAY_S."""
GRACE_S = 30
REFRESH_S = 5.0
PROJECT = "monaserve-test"


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    """The backbone the containers make with --random-init (seed 0), which packages must be trained on."""
    return Backbone.load(TINY)


def half_sent_request(port: int, body: bytes) -> socket.socket:
    """A classify request whose headers and first half of the body are sent: in flight until the rest is."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = f"POST /v1/tasks/cls/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def finish_request(sock: socket.socket, body: bytes) -> tuple[int, bytes]:
    """Send the rest of `half_sent_request`'s body; returns the status and the raw answer."""
    sock.sendall(body[len(body) // 2 :])
    answer = b""
    while not answer.endswith(b"}") and (chunk := sock.recv(65536)):
        answer += chunk
    sock.close()
    return int(answer.split(b" ", 2)[1]), answer


def test_one_container_as_uid_10001_on_a_read_only_root(backbone, report_figures):
    port, suffix = free_port(), str(time.monotonic_ns())
    store, models = f"monaserve-test-store-{suffix}", f"monaserve-test-models-{suffix}"
    podman("volume", "create", store)
    podman("volume", "create", models)
    run = [
        "--read-only", "--read-only-tmpfs=false", "--tmpfs=/tmp", "--publish", f"127.0.0.1:{port}:8000",
        f"--volume={store}:{STORE}", f"--volume={models}:{MODELS}", f"--env=MONASERVE_ADMIN_TOKEN={TOKEN}",
        MONASERVE_IMAGE, "--random-init", "--backbone", TINY,
    ]  # fmt: skip
    try:
        with (
            Container.run(f"monaserve-test-one-{suffix}", *run) as container,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http,
        ):
            healthy_s = container.wait_healthy(300)
            assert container.inspect()["State"]["Health"]["Status"] == "healthy"
            ready_s = healthy_s + wait_for(lambda: http.get("/health/ready").status_code == 200, 300, "ready")
            assert container.exec("id", "-u").stdout.strip() == "10001"

            # an adapter uploaded, classified with, then replaced by v2 without a restart
            started_at = container.inspect()["State"]["StartedAt"]
            image = image_bytes(0, size=(96, 96))
            upload = http.put("/v1/adapters/cls", content=random_package(backbone, "cls", seed=1).to_bytes(), headers=ADMIN)
            assert upload.status_code == 201, upload.text
            first = http.post("/v1/tasks/cls/classify", content=image, headers=JPEG)
            assert first.status_code == 200 and first.json()["version"] == 1, first.text
            v2 = random_package(backbone, "cls", seed=2, version=2).to_bytes()
            assert http.put("/v1/adapters/cls", content=v2, headers=ADMIN).status_code == 201
            assert http.post("/v1/tasks/cls/classify", content=image, headers=JPEG).json()["version"] == 2
            assert container.inspect()["State"]["StartedAt"] == started_at

            # the root is read-only; the declared volumes and /tmp (a tmpfs, as the Kubernetes manifest's
            # emptyDir) are writable, and the store is on its volume
            for read_only in ("/opt/venv", "/var/lib/monaserve", "/var/tmp", "/run"):
                denied = container.exec("touch", f"{read_only}/probe")
                assert denied.returncode != 0 and "Read-only file system" in denied.stderr, read_only
            for writable in (STORE, MODELS, "/tmp"):
                assert container.exec("touch", f"{writable}/probe").returncode == 0, writable
                container.exec("rm", f"{writable}/probe", check=True)
            on_volume = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", store).stdout.strip())
            assert sorted(p.name for p in (on_volume / "cls").glob("*.safetensors")) == ["1.safetensors", "2.safetensors"]
            assert {p.stat().st_uid for p in (on_volume / "cls").iterdir()} == {10001}

            # `podman stop` while a request is in flight: readiness fails for the drain delay, the request
            # (finished after that delay) is answered, and the server exits 0 within the grace period
            in_flight = half_sent_request(port, image)
            time.sleep(0.5)
            stopping_at = time.monotonic()
            stop = threading.Thread(target=podman, args=("stop", "--time", str(GRACE_S), container.name))
            stop.start()
            wait_for(lambda: http.get("/health/ready").status_code == 503, DRAIN_DELAY_S, "readiness fails while draining")
            time.sleep(DRAIN_DELAY_S + 2 - (time.monotonic() - stopping_at))
            status, answer = finish_request(in_flight, image)
            stop.join(GRACE_S + 30)
            stopped_s = time.monotonic() - stopping_at
            assert status == 200 and b'"version":2' in answer.replace(b" ", b""), answer[-2000:]
            state = container.inspect()["State"]
            assert state["ExitCode"] == 0 and stopped_s < GRACE_S, (state["ExitCode"], stopped_s, container.logs()[-3000:])
    finally:
        podman("volume", "rm", "--force", store, models, check=False)
    report_figures("one container", {"healthy_s": round(healthy_s, 1), "ready_s": round(ready_s, 1), "stop_s": round(stopped_s, 1)})


class ComposeProject:
    """deploy/compose.yaml with deploy/compose.cpu.yaml, run by podman-compose as project `monaserve-test`."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.command = [sys.executable, "-m", "podman_compose", "--project-name", PROJECT, "-f", "compose.yaml", "-f", "compose.cpu.yaml"]

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.command, *args], cwd=ROOT / "deploy", env=self.env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"podman-compose {' '.join(args)}: {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    def containers(self) -> dict[str, Container]:
        """Service name -> its container."""
        listed = json.loads(podman("ps", "--all", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format", "json").stdout)
        return {entry["Labels"]["com.docker.compose.service"]: Container(entry["Names"][0]) for entry in listed}


def test_three_replicas_and_nginx_from_the_compose_files(backbone, report_figures):
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "MONASERVE_ADMIN_TOKEN": TOKEN,
        "MONASERVE_BACKBONE": TINY,
        "MONASERVE_WEIGHTS": "random",
        "MONASERVE_CATALOG_REFRESH_S": str(REFRESH_S),
        "MONASERVE_GATEWAY_IMAGE": NGINX_IMAGE,
        "MONASERVE_GATEWAY_HTTP_PORT": str(http_port),
        "MONASERVE_GATEWAY_GRPC_PORT": str(grpc_port),
    }
    compose = ComposeProject(env)
    figures: dict[str, object] = {}
    image = image_bytes(0, size=(96, 96))
    gateway_url = f"http://127.0.0.1:{http_port}"
    try:
        started = time.monotonic()
        compose("up", "--detach", "--no-build")
        containers = compose.containers()
        replicas = {name: c for name, c in containers.items() if name.startswith("monaserve-")}
        assert sorted(replicas) == ["monaserve-1", "monaserve-2", "monaserve-3"] and "gateway" in containers
        for container in replicas.values():
            container.wait_healthy(300)
        direct = {name: f"http://{c.address()}:8000" for name, c in replicas.items()}
        for url in direct.values():
            wait_for(lambda url=url: httpx.get(url + "/health/ready", timeout=2).status_code == 200, 300, f"{url} ready")
        figures["all_ready_s"] = round(time.monotonic() - started, 1)

        with httpx.Client(base_url=gateway_url, headers=ADMIN, timeout=60) as gateway:
            tasks = [f"task-{i}" for i in range(6)]
            for i, task in enumerate(tasks):
                upload = gateway.put(f"/v1/adapters/{task}", content=random_package(backbone, task, seed=i).to_bytes())
                assert upload.status_code == 201, upload.text

            # every replica serves what was uploaded through the gateway, from the shared volume
            for name, url in direct.items():
                response = httpx.post(url + "/v1/tasks/task-0/classify", content=image, headers=JPEG, timeout=60)
                assert response.status_code == 200 and response.json()["version"] == 1, response.text
                assert response.headers[REPLICA_HEADER].startswith(name)

            # gRPC through nginx's HTTP/2 listener, published on the host
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
                raw = [struct.pack("<I", len(image)) + image]
                request = pb.ModelInferRequest(model_name="task-0", inputs=[tensor], raw_input_contents=raw)
                assert GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60).model_version == "1"

            # a new version is served by every replica within the refresh period of its being stored
            v2 = random_package(backbone, "task-0", seed=9, version=2).to_bytes()
            assert gateway.put("/v1/adapters/task-0", content=v2).status_code == 201
            stored_at = time.monotonic()
            deadline = stored_at + REFRESH_S + 3  # a refresh tick reads the store, then a request is answered
            for url in direct.values():
                wait_for(
                    lambda url=url: (
                        httpx.post(url + "/v1/tasks/task-0/classify", content=image, headers=JPEG, timeout=60).json()["version"] == 2
                    ),
                    deadline - time.monotonic(),
                    f"{url} serves v2",
                )
            figures["propagation_s"] = round(time.monotonic() - stored_at, 2)

            # the replica with the most traffic is killed under load through the gateway: nothing is lost
            answers = [gateway.post(f"/v1/tasks/{task}/classify", content=image, headers=JPEG) for task in tasks]
            by_replica = Counter(answer.headers[REPLICA_HEADER].split(":")[0] for answer in answers)
            victim = by_replica.most_common(1)[0][0]
            with RequestLoops(gateway_url, tasks, image) as load:
                time.sleep(3)
                address = replicas[victim].address()
                os.kill(replicas[victim].inspect()["State"]["Pid"], signal.SIGKILL)  # a crash, not a `podman stop`
                killed_at = load.sent
                time.sleep(6)
            figures |= {"victim": victim, "requests": load.sent, "after_kill": load.sent - killed_at, "served_by": dict(load.served_by)}
            assert load.statuses.keys() == {200}, f"lost requests: {dict(load.statuses)}"

            # compose's `restart: unless-stopped` brings it back, and nginx sends its tasks to it again
            replicas[victim].wait_healthy(300)
            figures["restarts"] = replicas[victim].inspect()["RestartCount"]
            figures["same_address"] = replicas[victim].address() == address
            rejoin = wait_for(
                lambda: any(
                    gateway.post(f"/v1/tasks/{task}/classify", content=image, headers=JPEG).headers[REPLICA_HEADER].startswith(victim)
                    for task in tasks
                ),
                120,
                "the restarted replica serves through nginx again",
            )
            figures["rejoin_s"] = round(rejoin, 1)
    finally:
        logs = {name: c.logs()[-2000:] for name, c in compose.containers().items()}
        compose("down", "--volumes", "--timeout", "10")
    assert not podman("volume", "ls", "--quiet", "--filter", f"label=io.podman.compose.project={PROJECT}").stdout.strip(), logs
    report_figures("compose", figures)
