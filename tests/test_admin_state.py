"""Admin state on real servers: the same for every replica on one store, kept across restarts, and never
a 500 when admin calls race each other."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import pytest

from helpers import random_package
from server_harness import TOKEN, ServerProcess, image_bytes

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("front_ends")]

JPEG = {"content-type": "image/jpeg"}


def replica(tmp_path, weights, name: str, *args: str) -> ServerProcess:
    return ServerProcess(
        weights,
        tmp_path / "store",
        "--catalog-refresh-s",
        "0.5",
        "--replica-id",
        name,
        *args,
        env={"MONASERVE_ADMIN_TOKEN": TOKEN},
        log=tmp_path / f"{name}.log",
    )


def served_version(server: ServerProcess, task: str, **params) -> int | str:
    with server.client(token=None) as client:
        response = client.post(f"/v1/tasks/{task}/classify", params=params, content=image_bytes(0, size=(64, 64)), headers=JPEG)
    return response.json()["version"] if response.status_code == 200 else f"{response.status_code} {response.json()['error']}"


def eventually(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, what
            return value
        time.sleep(0.1)


@pytest.mark.slow
def test_rollback_and_unload_hold_on_every_replica_and_across_restarts(tmp_path, tiny_weights, shared_backbone):
    for version in (1, 2):
        random_package(shared_backbone, "pets", seed=version, version=version).save(tmp_path / "store" / "pets" / f"{version}.safetensors")
    a, b = replica(tmp_path, tiny_weights, "a"), replica(tmp_path, tiny_weights, "b")
    try:
        for server in (a, b):
            server.wait_ready()
            assert served_version(server, "pets") == 2

        with a.client() as admin:  # rollback through A: every replica serves v1, also after a restart
            assert admin.post("/v1/adapters/pets/load", json={"version": 1}).json()["serving_version"] == 1
        assert served_version(a, "pets") == 1
        eventually(lambda: served_version(b, "pets") == 1, "B serves the rollback")
        b.stop()
        b = replica(tmp_path, tiny_weights, "b").wait_ready()
        assert served_version(b, "pets") == 1

        with b.client() as admin:  # unload through B: A refuses every request for the task, pinned or not
            assert admin.delete("/v1/adapters/pets").status_code == 200
        eventually(lambda: served_version(a, "pets") == "404 task_unloaded", "A refuses the unloaded task")
        assert served_version(a, "pets", version=1) == served_version(b, "pets", version=2) == "404 task_unloaded"
        with a.client() as admin:
            assert all(v["location"] != "slot" for v in admin.get("/v1/adapters/pets").json()["versions"])
        a.stop()
        a = replica(tmp_path, tiny_weights, "a").wait_ready()
        assert served_version(a, "pets") == "404 task_unloaded"

        with a.client() as admin:  # a load brings it back everywhere, serving the newest
            assert admin.post("/v1/adapters/pets/load").json()["serving_version"] == 2
        eventually(lambda: served_version(b, "pets") == 2, "B serves the task again")
    finally:
        a.stop()
        b.stop()


def test_stale_temp_files_go_at_start_up_and_fresh_ones_stay(tmp_path, tiny_weights, shared_backbone):
    folder = tmp_path / "store" / "pets"
    random_package(shared_backbone, "pets", seed=1).save(folder / "1.safetensors")
    stale, fresh = folder / ".2.safetensors.k1ll3d.tmp", folder / ".3.safetensors.wr1t1ng.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"\0" * 4096)
    os.utime(stale, (time.time() - 3600,) * 2)
    with replica(tmp_path, tiny_weights, "a") as server:
        assert not stale.exists() and fresh.exists()
        assert "left by a writer that stopped mid-write" in server.log()
        assert served_version(server, "pets") == 1


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["one replica", "two replicas"])
def test_uploads_racing_purges_are_never_a_500(tmp_path, tiny_weights, shared_backbone, topology):
    """A PUT and a DELETE ?purge=true of one task at once, round after round (through one replica, or
    one each through two replicas on one store): each answer is a defined one, and afterwards the store
    holds no temp file and the catalog agrees with it."""
    a = replica(tmp_path, tiny_weights, "a").wait_ready()
    b = replica(tmp_path, tiny_weights, "b").wait_ready() if topology == "two replicas" else a
    packages = [random_package(shared_backbone, "race", seed=i).to_bytes() for i in range(2)]
    answers: Counter = Counter()
    try:
        with a.client() as uploader, b.client() as purger:
            for round_ in range(12):
                results = {}
                upload = threading.Thread(
                    target=lambda results=results, package=packages[round_ % 2]: results.__setitem__(
                        "put", uploader.put("/v1/adapters/race", params={"version": 1}, content=package)
                    )
                )
                purge = threading.Thread(
                    target=lambda results=results: results.__setitem__(
                        "delete", purger.delete("/v1/adapters/race", params={"purge": "true"})
                    )
                )
                upload.start()
                time.sleep(0.002 * (round_ % 4))
                purge.start()
                upload.join()
                purge.join()
                for call, response in results.items():
                    answers[f"{call} {response.status_code}"] += 1
                    assert response.status_code in (200, 201, 404, 409), response.text
                    if response.status_code == 409:
                        assert response.json()["error"] in ("concurrent_change", "version_exists") and response.json()["message"]
                stored = sorted(p.name for p in (tmp_path / "store" / "race").glob("*")) if (tmp_path / "store" / "race").exists() else []
                assert not [name for name in stored if name.endswith(".tmp")]
                listed = uploader.get("/v1/adapters/race")
                if stored and any(name.endswith(".safetensors") for name in stored):
                    assert listed.status_code == 200 and [v["version"] for v in listed.json()["versions"]] == [1]
                else:
                    purger.delete("/v1/adapters/race", params={"purge": "true"})  # start the next round clean
        print(f"{topology}: {dict(answers)}")
    finally:
        a.stop()
        b.stop()
