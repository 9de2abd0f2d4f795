"""Deployment files: the Dockerfile's properties and entrypoint, compose and Kubernetes manifests, nginx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from monaserve.server.cli import build_parser

from deploy_harness import ROOT, Nginx, parse_dockerfile, parse_env, require_tool
from server_harness import TOKEN, free_port

K8S = ROOT / "deploy" / "k8s"


def serve_env_names() -> set[str]:
    """MONASERVE_* names of every `monaserve serve` flag."""
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    return {
        "MONASERVE_" + option[2:].upper().replace("-", "_")
        for action in serve._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


def test_dockerfile_has_cpu_and_cuda_targets(dockerfile):
    preamble, stages = dockerfile
    assert ("ARG", "TARGET=cuda") in preamble
    names = {stage.name: stage for stage in stages}
    assert names.keys() == {"base-cpu", "base-cuda", "runtime"}
    defaults = dict(arg.split("=", 1) for kind, arg in preamble if kind == "ARG" and "=" in arg)
    assert names["base-cpu"].base == "${CPU_BASE}" and names["base-cuda"].base == "${CUDA_BASE}"  # build arguments, so
    assert defaults["CPU_BASE"].startswith("python:3.11") and defaults["CPU_TORCH_INDEX"].endswith("/whl/cpu")  # local
    assert defaults["CUDA_BASE"].startswith("nvidia/cuda:") and "runtime" in defaults["CUDA_BASE"]  # bases can stand in
    assert names["runtime"].base == "base-${TARGET}" and stages[-1].name == "runtime"
    torch_step = next(i for i, (kind, args) in enumerate(names["runtime"].instructions) if "torch" in args)
    first_copy = next(i for i, (kind, _) in enumerate(names["runtime"].instructions) if kind == "COPY")
    assert torch_step < first_copy  # torch's layer is reused while only the sources change


def test_runtime_stage_runs_unprivileged_with_healthcheck_port_volumes_and_env(dockerfile):
    runtime = dockerfile[1][-1]
    (user,) = runtime.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = runtime.all("HEALTHCHECK")
    assert "/health/live" in healthcheck and "--start-period=" in healthcheck
    assert runtime.all("EXPOSE") == ["8000 8001"]  # HTTP, and the Open Inference Protocol's gRPC
    volumes = json.loads(runtime.all("VOLUME")[0])
    env = {k: v for args in runtime.all("ENV") for k, v in parse_env(args).items()}
    assert env["MONASERVE_STORE"] in volumes and "/models" in volumes and env["HF_HOME"].startswith("/models")
    assert env["MONASERVE_COMPILE_CACHE"].startswith("/models/")  # written at start on a GPU, under a read-only root
    assert env["MONASERVE_HOST"] == "0.0.0.0"
    unknown = {k for k in env if k.startswith("MONASERVE_")} - serve_env_names()
    assert not unknown, f"ENV names no serve flag: {unknown}"
    assert json.loads(runtime.all("ENTRYPOINT")[0]) == ["monaserve", "serve"]


def test_image_holds_no_weights_and_the_context_leaves_them_out(dockerfile):
    copied = [args.split()[0] for stage in dockerfile[1] for args in stage.all("COPY") if not args.startswith("--from")]
    assert all((ROOT / path).exists() for path in copied)
    assert not any(path.endswith((".safetensors", ".pth", ".pt")) or path.startswith("var") for path in copied)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var", "*.safetensors", "*.pth"} <= set(ignored)


@pytest.mark.process
def test_the_copied_sources_build_the_package(dockerfile, tmp_path):
    """The files the image copies to /src are enough to build the wheel it installs from there."""
    context = tmp_path / "image"
    for args in dockerfile[1][-1].all("COPY"):
        *sources, target = args.split()
        target = target.lstrip("/")
        for source in sources:
            destination = context / target / (Path(source).name if target.endswith("/") else "")
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, context / target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, destination)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(context / "src")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("monaserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "monaserve/server/cli.py",
        "monaserve/adapters/mona.py",
        "monaserve/client/__init__.py",
        "monaserve/server/static/playground.html",
    } <= names


@pytest.mark.process
def test_entrypoint_and_healthcheck_work_when_run_directly(dockerfile, tiny_weights, tmp_path):
    """The image's ENTRYPOINT with its ENV (paths pointed at local files), then its HEALTHCHECK command."""
    runtime = dockerfile[1][-1]
    env = {k: v for args in runtime.all("ENV") for k, v in parse_env(args).items() if k.startswith("MONASERVE_")}
    port = free_port()
    env |= {
        "MONASERVE_HOST": "127.0.0.1",
        "MONASERVE_PORT": str(port),
        "MONASERVE_WEIGHTS": str(tiny_weights),
        "MONASERVE_STORE": str(tmp_path / "adapters"),
        "MONASERVE_ADMIN_TOKEN": TOKEN,
    }
    command = json.loads(runtime.all("ENTRYPOINT")[0])
    executable = Path(sys.executable).with_name(command[0])
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([str(executable), *command[1:]], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        healthcheck = json.loads(runtime.all("HEALTHCHECK")[0].split(" CMD ", 1)[1])
        assert healthcheck[0] == "python3"
        check = [sys.executable, *healthcheck[1:]]
        for _ in range(600):
            if process.poll() is not None:
                pytest.fail(f"the entrypoint exited with {process.returncode}: {(tmp_path / 'server.log').read_text()}")
            if subprocess.run(check, env={**os.environ, **env}, capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the HEALTHCHECK never passed")
        assert process.poll() is None
    finally:
        process.terminate()
        assert process.wait(60) == 0


def compose(*files: str) -> subprocess.CompletedProcess:
    binary = require_tool("docker-compose")
    env = {**os.environ, "MONASERVE_ADMIN_TOKEN": "x", "MINIO_ROOT_PASSWORD": "y"}
    args = [binary, *(arg for f in files for arg in ("-f", f)), "config", "-q"]
    return subprocess.run(args, cwd=ROOT / "deploy", env=env, capture_output=True, text=True)


def test_compose_files_are_valid():
    assert compose("compose.yaml").returncode == 0, compose("compose.yaml").stderr
    with_s3 = compose("compose.yaml", "compose.s3.yaml")
    assert with_s3.returncode == 0, with_s3.stderr


def test_the_cpu_override_drops_the_gpu_reservation_and_builds_the_cpu_target():
    """compose.cpu.yaml's `!reset` is Compose 2.18's, which docker-compose 1.29 cannot read: podman-compose
    (what tests/test_image.py runs it with) merges the two files here."""
    env = {**os.environ, "MONASERVE_ADMIN_TOKEN": "x"}
    command = [sys.executable, "-m", "podman_compose", "-f", "compose.yaml", "-f", "compose.cpu.yaml", "config"]
    done = subprocess.run(command, cwd=ROOT / "deploy", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout.replace("!reset ", ""))["services"]  # the `x-cpu` fragment keeps its tag
    gpu = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["x-monaserve"]["deploy"]
    assert gpu["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"  # what the override removes
    for name in ("monaserve-1", "monaserve-2", "monaserve-3"):
        assert "deploy" not in services[name] and services[name]["image"] == "monaserve:cpu"
        assert services[name]["build"]["args"][-1] == "TARGET=cpu"  # the last of a repeated build argument wins
    assert "deploy" not in services["gateway"]


def test_compose_validation_catches_a_broken_file(tmp_path):
    broken = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    broken["services"]["gateway"]["ports"] = {"not": "a list"}
    (ROOT / "deploy" / ".broken-compose.yaml").write_text(yaml.safe_dump(broken))
    try:
        assert compose(".broken-compose.yaml").returncode != 0
    finally:
        (ROOT / "deploy" / ".broken-compose.yaml").unlink()


def k8s_documents() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


@pytest.mark.parametrize(("name", "doc"), k8s_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubernetes_manifests_validate_strictly(name, doc):
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kubernetes_validation_catches_a_broken_manifest():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


def test_kubernetes_rollout_settings_fit_the_server():
    docs = {doc["kind"]: doc for _, doc in k8s_documents()}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {p.name for p in K8S.glob("*.yaml")} - set(kustomization["resources"]) == {"kustomization.yaml", "secret.example.yaml"}
    config = docs["ConfigMap"]["data"]
    assert set(config) <= serve_env_names()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = pre_stop + float(config["MONASERVE_DRAIN_DELAY_S"]) + float(config["MONASERVE_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > needed
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # slow model loads
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == labels == docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_nginx_config_is_valid(tmp_path):
    result = Nginx([free_port(), free_port()], tmp_path, free_port()).test_config()
    assert result.returncode == 0, result.stderr
    assert "hash $monaserve_task consistent" in (tmp_path / "nginx.conf").read_text()
