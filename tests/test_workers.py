"""`--workers N`: the pieces (shared body budgets, the run directory, the default N, which routes are
forwarded) in this process, then a real server of one engine process and two front ends: all of them
in `/metrics`, a front end killed and started again, the engine's death, and the drain in order."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from monaserve.server import config as config_module
from monaserve.server.app import _register_routes
from monaserve.server.budgets import BodyBudget, SharedTally
from monaserve.server.config import ServeConfig, usable_cores
from monaserve.server.dataplane import DataPlane
from monaserve.server.forward import forwarded_url
from monaserve.server.run_dir import TALLY_ROWS, RunDir, secrets_environment
from monaserve.server.runtime import Runtime
from monaserve.testing import FAULTS

from server_harness import TOKEN, image_bytes, serve_tasks

# ---- in this process ---------------------------------------------------------------------------


def test_a_body_budget_counts_what_every_front_end_holds(tmp_path):
    """Two front ends' tallies of one budget: each sees the other's bytes, and a restarted one starts from zero."""
    (tmp_path / "tallies").write_bytes(bytes(8 * 2))
    first = BodyBudget(1000, "--max-body-buffer-mb", SharedTally(tmp_path / "tallies", offset=0, slots=2, own=0))
    second = BodyBudget(1000, "--max-body-buffer-mb", SharedTally(tmp_path / "tallies", offset=0, slots=2, own=1))
    assert first.take(700)
    assert second.held == 700 and not second.take(400)  # together past the capacity
    assert second.take(300) and first.held == 1000
    first.give(700)
    assert second.take(600) and first.held == 900
    restarted = BodyBudget(1000, "--max-body-buffer-mb", SharedTally(tmp_path / "tallies", offset=0, slots=2, own=1))
    assert restarted.held == first.held == 0  # the slot of a process that died holding bytes is cleared


def test_a_lone_body_is_never_refused_by_a_shared_budget(tmp_path):
    (tmp_path / "tallies").write_bytes(bytes(8 * 2))
    budget = BodyBudget(100, "--max-body-buffer-mb", SharedTally(tmp_path / "tallies", offset=0, slots=2, own=0))
    assert budget.take(50) and budget.take(500, own=50)  # the only body held: one as large as the request limit gets through


def test_the_run_directory_gives_every_child_the_supervisors_config_but_not_its_secrets(tmp_path, monkeypatch):
    config = ServeConfig(
        weights="random", store=str(tmp_path / "store"), workers=3, demo_data=tmp_path / "demo", max_batch=7, admin_token="s3cret"
    )
    run = RunDir.make(config)
    try:
        assert "s3cret" not in run.config.read_text() and oct(run.config.stat().st_mode & 0o777) == "0o600"
        monkeypatch.setenv("MONASERVE_ADMIN_TOKEN", secrets_environment(config)["MONASERVE_ADMIN_TOKEN"])  # as a child gets it
        assert run.read_config() == config
        assert oct(run.path.stat().st_mode & 0o777) == "0o700"
        assert run.tallies.stat().st_size == 8 * TALLY_ROWS * 3
    finally:
        for child in run.path.iterdir():
            child.rmdir() if child.is_dir() else child.unlink()
        run.path.rmdir()


@pytest.fixture
def machine(monkeypatch):
    """Sets the cores this process may use and the room in /dev/shm, as `(cores, MiB)`."""

    def set_machine(cores: int, shm_mib: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(config_module, "usable_cores", functools.partial(usable_cores, Path("/nonexistent")))
        monkeypatch.setattr(config_module, "shared_memory_room", lambda: shm_mib << 20)

    return set_machine


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 8)])
def test_front_ends_default_to_a_share_of_the_cores(machine, cores, expected):
    machine(cores, 64 << 10)
    assert ServeConfig().front_ends == expected
    assert ServeConfig(workers=5).front_ends == 5


def test_the_default_is_one_process_where_several_cannot_work(machine):
    machine(16, 64 << 10)
    assert ServeConfig(jpeg_decode="device").front_ends == ServeConfig(port=0).front_ends == 1
    machine(16, 600)  # room for 4 arenas of 128 MiB
    assert ServeConfig().front_ends == 4
    machine(16, 64)  # Docker's default /dev/shm: not one arena
    assert ServeConfig().front_ends == 1


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000", 16), ("400000 100000", 4), ("150000 100000", 2), ("50000 100000", 1)])
def test_a_containers_cpu_quota_caps_the_cores(monkeypatch, tmp_path, cpu_max, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert usable_cores(tmp_path / "cpu.max") == expected


def test_settings_that_cannot_work_with_several_front_ends_are_refused(machine):
    machine(16, 200)
    with pytest.raises(ValueError, match="--workers must be 1 or more"):
        ServeConfig(workers=0).check()
    with pytest.raises(ValueError, match="--jpeg-decode device needs --workers 1"):
        ServeConfig(workers=2, jpeg_decode="device").check()
    with pytest.raises(ValueError, match="--workers 2 needs a fixed --port"):
        ServeConfig(workers=2, port=0).check()
    with pytest.raises(ValueError, match=r"needs 256 MiB of /dev/shm .* 200 MiB are free: give /dev/shm more room \(docker run --shm-size"):
        ServeConfig(workers=2).check()
    ServeConfig(workers=2, arena_mb=64).check()


def test_every_admin_route_and_only_those_go_to_the_engine_process(tmp_path):
    app = FastAPI()
    routes = _register_routes(app, DataPlane(Runtime(ServeConfig(store=str(tmp_path)))), ServeConfig())
    forwarded = {(method, route.path) for route in routes for method in route.methods}
    assert forwarded == {
        ("GET", "/v1/adapters"),
        ("GET", "/v1/adapters/{task}"),
        ("PUT", "/v1/adapters/{task}"),
        ("DELETE", "/v1/adapters/{task}"),
        ("POST", "/v1/adapters/{task}/load"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/{name}/load"),
        ("POST", "/v2/repository/models/{name}/unload"),
    }


@pytest.mark.parametrize(
    ("raw_path", "query", "expected"),
    [
        (b"/v1/adapters/cls", b"", "/v1/adapters/cls"),
        (b"/v1/adapters/..", b"", "/v1/adapters/%2E%2E"),  # httpx would resolve a bare '..' to /v1
        (b"/v1/adapters/./load", b"purge=true", "/v1/adapters/%2E/load?purge=true"),
        (b"/v1/adapters/%C2%B4%04/load", b"x=%01&y=a b", "/v1/adapters/%C2%B4%04/load?x=%01&y=a%20b"),
        (b"/v1/adapters/\xc2\xb4", b"", "/v1/adapters/%C2%B4"),
    ],
)
def test_a_forwarded_url_is_the_path_this_process_matched(raw_path, query, expected):
    assert forwarded_url({"raw_path": raw_path, "path": "unused", "query_string": query}) == expected


# ---- a real server with two front ends ---------------------------------------------------------------


def children(pid: int) -> dict[str, int]:
    """The supervisor's children by role: {'engine': pid, 'front-end 0': pid, ...}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"monaserve.server.workers" in command:
            role, index = command[3].decode(), command[5].decode()
            found[role if role == "engine" else f"{role} {index}"] = int(entry.name)
    return found


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def classify(url: str) -> httpx.Response:
    """One request on a connection of its own (so the kernel may give it to either front end)."""
    return httpx.post(f"{url}/v1/tasks/cls/classify", content=image_bytes(1), headers={"content-type": "image/jpeg"}, timeout=30)


@pytest.fixture
def workers_server(tmp_path_factory, tiny_weights, shared_backbone):
    """Two front ends and an engine whose batches wait while `server.engine_gate` exists. Its temporary
    folders (the run folder, the launcher's) go under pytest's: a test SIGKILLs the supervisor, which can
    then remove neither."""
    gate = tmp_path_factory.mktemp("gate") / "engine"
    launcher = [*FAULTS, f"monaserve.server.scheduler:Scheduler._forward@{gate}"]
    flags = ("--workers", "2", "--drain-delay-s", "0.5")
    env = {"TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    with serve_tasks(tmp_path_factory, tiny_weights, shared_backbone, {"cls": "classify"}, *flags, launcher=launcher, env=env) as server:
        server.engine_gate = gate
        yield server


@pytest.mark.process
def test_metrics_cover_every_process_and_a_killed_front_end_comes_back(workers_server):
    server = workers_server
    roles = children(server.process.pid)
    assert set(roles) == {"engine", "front-end 0", "front-end 1"}
    answers = [classify(server.url) for _ in range(20)]
    assert all(a.status_code == 200 for a in answers)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "monaserve_requests_total", task="cls", status="200") == 20  # whichever front end served them
    assert metric(text, "monaserve_batch_size_count") >= 1 and metric(text, "monaserve_adapter_slots") > 0  # the engine's
    assert metric(text, "monaserve_ready") == 1

    os.kill(roles["front-end 1"], signal.SIGKILL)
    wait_until(lambda: children(server.process.pid).get("front-end 1", roles["front-end 1"]) != roles["front-end 1"], "a new front end")
    assert "front end 2 exited (code -9); starting it again" in server.log()
    assert all(classify(server.url).status_code == 200 for _ in range(10))  # the other served meanwhile; both serve now
    wait_until(lambda: metric(httpx.get(f"{server.url}/metrics").text, "monaserve_ready") == 1, "every process to be ready")
    assert metric(httpx.get(f"{server.url}/metrics").text, "monaserve_requests_total", task="cls", status="200") == 30  # counts kept


@pytest.mark.process
def test_sigterm_finishes_requests_in_flight_before_the_engine_stops(workers_server):
    server = workers_server
    held = server.engine_gate.with_name(server.engine_gate.name + ".held")
    server.engine_gate.touch()
    answers = []
    request = threading.Thread(target=lambda: answers.append(classify(server.url)))
    request.start()
    wait_until(held.exists, "the engine to hold the request's batch")
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{server.url}/health/ready").status_code == 503, "readiness to turn false")
    time.sleep(1.0)  # past the drain delay: the front ends wait for their request, the engine for them
    assert server.process.poll() is None
    server.engine_gate.unlink()
    request.join()
    assert answers[0].status_code == 200
    assert server.process.wait(30) == 0


@pytest.mark.process
def test_the_engine_dying_stops_the_server_with_exit_1(workers_server):
    server = workers_server
    roles = children(server.process.pid)
    os.kill(roles["engine"], signal.SIGKILL)
    assert server.process.wait(30) == 1
    assert "the engine process exited (code -9); stopping the server" in server.log()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in roles.values()), "the front ends to stop", timeout_s=10)


@pytest.mark.process
def test_a_killed_supervisor_takes_its_children_with_it(workers_server):
    server = workers_server
    roles = children(server.process.pid)
    server.process.kill()
    server.process.wait()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in roles.values()), "the children to stop", timeout_s=10)


@pytest.mark.process
def test_an_upload_answered_by_the_engine_is_served_by_every_front_end_at_once(workers_server, shared_backbone):
    from helpers import random_package

    server = workers_server
    v2 = random_package(shared_backbone, "cls", seed=9, num_labels=4, version=2)
    upload = httpx.put(f"{server.url}/v1/adapters/cls", content=v2.to_bytes(), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert upload.status_code == 201 and upload.json()["serving_version"] == 2
    versions = {classify(server.url).json()["version"] for _ in range(20)}  # no refresh period waited: announced
    assert versions == {2}
