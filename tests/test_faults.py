"""Faults on a real server: the store turning full, then read-only, under uploads; corrupt files placed
straight into the store. (SIGTERM during a batch is in test_server_serving.py, a replica killed behind
nginx in test_topology.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from monaserve.adapters import BackboneRef

from helpers import random_package
from server_harness import TOKEN, ServerProcess, image_bytes, serve_tasks

pytestmark = pytest.mark.process

IMAGE = {"image": ("x.jpg", image_bytes(3), "image/jpeg")}


def store_namespace(store: Path, size: int, seed: Path) -> list[str]:
    """A launcher: the server in a mount namespace of its own, where `store` is a tmpfs of `size` bytes
    holding a copy of `seed`. A real filesystem that fills up and can be remounted read-only."""
    try:
        subprocess.run(["unshare", "--mount", "--map-root-user", "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"unshare --mount --map-root-user fails here: {exc}")
        pytest.skip(f"no mount namespaces for this user: {exc}")
    script = 'mount -t tmpfs -o size="$1" monaserve-store "$2" && cp -R "$3"/. "$2"/ && shift 3 && exec "$@"'
    return ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(size), str(store), str(seed)]


def in_namespace(server: ServerProcess, *command: str) -> str:
    """Run `command` in the server's mount namespace; returns its output."""
    enter = ["nsenter", "-t", str(server.process.pid), "-U", "-m", "--preserve-credentials"]
    return subprocess.run([*enter, *command], check=True, capture_output=True, text=True).stdout


def classify_loop(url: str, stop: threading.Event, answers: list[tuple[float, httpx.Response]]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            answers.append((time.monotonic(), client.post("/v1/tasks/steady/classify", files=IMAGE)))


def test_a_full_then_read_only_store_refuses_changes_while_serving_goes_on(tmp_path, tiny_weights, shared_backbone):
    seed, store = tmp_path / "seed", tmp_path / "store"
    random_package(shared_backbone, "steady", seed=1, num_labels=4).save(seed / "steady" / "1.safetensors")
    v2 = random_package(shared_backbone, "steady", seed=2, num_labels=4, version=2).to_bytes()
    size = (seed / "steady" / "1.safetensors").stat().st_size + len(v2) // 2  # room for v1, not for v2 as well
    store.mkdir()
    launcher = store_namespace(store, size, seed)
    server = ServerProcess(
        tiny_weights, store, "--catalog-refresh-s", "0.5", env={"MONASERVE_ADMIN_TOKEN": TOKEN}, log=tmp_path / "log", launcher=launcher
    )
    answers: list[tuple[float, httpx.Response]] = []
    stop = threading.Event()
    with server, server.client() as admin:
        assert admin.post("/v1/tasks/steady/classify", files=IMAGE).status_code == 200  # v1 in its slot
        loop = threading.Thread(target=classify_loop, args=(server.url, stop, answers))
        loop.start()
        try:
            full = admin.put("/v1/adapters/steady", content=v2)
            stored_after_full = in_namespace(server, "ls", "-A", f"{store}/steady").split()
            slots_after_full = admin.get("/v1/adapters").json()["device"]["slots_used"]
            in_namespace(server, "mount", "-o", "remount,ro", str(store))
            read_only = admin.put("/v1/adapters/steady", content=v2)
            purge = admin.delete("/v1/adapters/steady", params={"purge": "true"})
            time.sleep(1.0)  # two catalog refreshes on the read-only store
            listing = admin.get("/v1/adapters/steady").json()
            in_namespace(server, "mount", "-o", f"remount,rw,size={4 * size}", str(store))
            recovering = time.monotonic()
            recovered = admin.put("/v1/adapters/steady", content=v2)
            time.sleep(0.5)
        finally:
            stop.set()
            loop.join()

    assert full.status_code == 507, full.text
    assert full.json()["error"] == "store_full" and "No space left on device" in full.json()["message"]
    assert stored_after_full == ["1.safetensors"]  # no partial file or temp file left behind
    assert slots_after_full == 1  # v2 was loaded to be checked, and let go when the store refused it
    assert read_only.status_code == 503 and read_only.json()["error"] == "store_unavailable", read_only.text
    assert "Read-only file system" in read_only.json()["message"] and read_only.headers["Retry-After"]
    assert purge.status_code == 503 and purge.json()["error"] == "store_unavailable", purge.text
    assert purge.headers["Retry-After"]
    assert listing["enabled"] and [v["version"] for v in listing["versions"]] == [1]  # the failed purge changed nothing
    assert recovered.status_code == 201, recovered.text  # the store came back: no restart needed
    assert answers and all(r.status_code == 200 for _, r in answers), [r.text for _, r in answers if r.status_code != 200][:3]
    during_failures = [r.json()["version"] for at, r in answers if at < recovering]
    assert len(during_failures) > 3 and set(during_failures) == {1}  # v1 served throughout the failures
    assert answers[-1][1].json()["version"] == 2


def place(path: Path, data: bytes) -> None:
    """Put a file into the store as an operator would, not through the API: copied beside it, then
    renamed into place (so no refresh sees it half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = path.with_name(f".{path.name}.copy")
    copy.write_bytes(data)
    os.replace(copy, path)


def store_errors(client: httpx.Client) -> float:
    return float(re.search(r"^monaserve_store_errors_total (\S+)$", client.get("/metrics").text, re.M).group(1))


def test_corrupt_files_in_the_store_are_skipped_logged_and_counted_once(tmp_path_factory, tiny_weights, shared_backbone):
    tasks = {"alpha": "classify", "beta": "classify"}
    server = serve_tasks(tmp_path_factory, tiny_weights, shared_backbone, tasks, "--catalog-refresh-s", "0.3")
    alpha2 = random_package(shared_backbone, "alpha", seed=5, num_labels=4, version=2).to_bytes()
    foreign = random_package(shared_backbone, "gamma", seed=6, num_labels=4)
    foreign = type(foreign)(
        manifest=foreign.manifest.model_copy(
            update={"backbone": BackboneRef(name=foreign.manifest.backbone.name, fingerprint="sha256:" + "0" * 64)}
        ),
        tensors=foreign.tensors,
    )
    with server, server.client() as client:
        place(server.store / "alpha" / "2.safetensors", alpha2[: len(alpha2) // 2])  # header reads, the body is cut
        place(server.store / "beta" / "2.safetensors", b"\0" * 100)  # not even a header
        place(server.store / "gamma" / "1.safetensors", foreign.to_bytes())  # another backbone's adapter
        random_package(shared_backbone, "delta", seed=7, num_labels=4).save(server.store / "delta" / "1.safetensors")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the refresh lists alpha v2 (its header reads) and delta
            listed = {t["name"]: t for t in client.get("/v1/tasks").json()}
            if "delta" in listed and listed["alpha"]["serving_version"] == 2:
                break
            time.sleep(0.1)
        assert store_errors(client) == 1  # beta/2: no header; alpha/2 and gamma/1 are found bad only when loaded
        answers = {task: client.post(f"/v1/tasks/{task}/classify", files=IMAGE) for task in ("alpha", "beta", "gamma", "delta")}
        pinned = client.post("/v1/tasks/alpha/classify", files=IMAGE, params={"version": 2})
        counted = store_errors(client)
        time.sleep(1.0)  # several more catalog refreshes over the same broken files
        counted_later = store_errors(client)
        alpha = client.get("/v1/tasks/alpha").json()
        purged = client.delete("/v1/adapters/gamma", params={"purge": "true"})  # only an unusable file is left
    log = server.log()

    assert answers["alpha"].status_code == 200 and answers["alpha"].json()["version"] == 1  # fell back to the last good one
    assert answers["beta"].status_code == 200 and answers["beta"].json()["version"] == 1
    assert answers["gamma"].status_code == 404 and answers["gamma"].json()["error"] == "unknown_task"
    assert answers["delta"].status_code == 200  # a good file placed beside the bad ones still loads
    assert pinned.status_code == 404 and pinned.json()["error"] == "unknown_version"
    assert alpha["versions"] == [1] and alpha["serving_version"] == 1
    assert counted == counted_later == 3  # one error per broken file, not one per refresh
    assert purged.status_code == 200 and not (server.store / "gamma").exists()
    for name in ("alpha/2", "beta/2", "gamma/1"):
        assert f"store: skipping {name}.safetensors" in log
    assert "backbone" in log.split("store: skipping gamma/1.safetensors", 1)[1].splitlines()[0]
