"""The first-run demo trains its three tasks once per backbone, into the store the server reads, while the
server already answers probes and says how far the training is."""

from __future__ import annotations

import re
import signal
import sys
import threading
import time

import httpx
import pytest

from monaserve.server.demo import DEMO_TASKS, DemoStopped, ensure_demo, missing_demo_tasks
from monaserve.server.lifecycle import Progress
from monaserve.server.store import AdapterStore

from server_harness import ServerProcess

REDUCED = [sys.executable, "-m", "monaserve.testing.reduced", "1,1,1,1"]


def test_demo_trains_once_per_backbone(tmp_path, tiny_weights, shared_backbone):
    store = AdapterStore(tmp_path / "store")
    quick = {"steps": 1, "size": 64, "images": 12, "progress": False, "say": lambda _: None}
    trained = ensure_demo(store, "swin_tiny_patch4_window7_224", str(tiny_weights), 0, tmp_path / "data", **quick)
    assert trained == list(DEMO_TASKS)
    for task, demo in DEMO_TASKS.items():
        manifest = store.manifest(task, 1)
        assert manifest.kind == demo.kind and manifest.backbone.fingerprint == shared_backbone.fingerprint
        assert manifest.training["steps"] == 1
    assert missing_demo_tasks(store, shared_backbone.fingerprint) == []
    assert ensure_demo(store, "swin_tiny_patch4_window7_224", str(tiny_weights), 0, tmp_path / "data", **quick) == []
    # another backbone's weights: the demo trains again, as new versions beside the old ones
    retrained = ensure_demo(store, "swin_tiny_patch4_window7_224", "random", 7, tmp_path / "data", **quick)
    assert retrained == list(DEMO_TASKS) and all(list(store.versions(t)) == [1, 2] for t in DEMO_TASKS)


@pytest.mark.slow
def test_demo_adapters_beat_untrained_ones_on_held_out_data(tmp_path):
    """The slower check: the demo's own training (random backbone, 100 steps each) clearly learns every kind."""
    store = AdapterStore(tmp_path / "store")
    ensure_demo(store, "swin_tiny_patch4_window7_224", "random", 0, tmp_path / "data", progress=False, say=lambda _: None)
    gains = {}
    for task in DEMO_TASKS:
        training = store.manifest(task, 1).training
        before, after = training["untrained_evaluation"], training["evaluation"]
        gains[task] = {metric: after[metric] - before[metric] for metric in after}
    assert gains["shapes-classify"]["top1"] >= 0.08, gains
    assert gains["shapes-detect"]["mAP50"] > 0.005, gains
    assert gains["shapes-segment"]["mIoU"] >= 0.15 and gains["shapes-segment"]["pixel_accuracy"] >= 0.3, gains


def test_demo_reports_its_progress_over_all_tasks_and_stops_when_asked(tmp_path, tiny_weights):
    store, reports, lines = AdapterStore(tmp_path / "store"), [], []
    stop = threading.Event()

    def report(progress: Progress) -> None:
        reports.append(progress)
        if progress.step == "2/3" and progress.eta_s is not None:
            stop.set()  # the server is told to stop while the second task trains

    with pytest.raises(DemoStopped):
        ensure_demo(
            store, "swin_tiny_patch4_window7_224", str(tiny_weights), 0, tmp_path / "data",
            steps=2, size=64, images=24, progress=False, say=lines.append, report=report, stop=stop,
        )  # fmt: skip
    assert {p.activity for p in reports} == {"training demo"}
    assert (reports[0].step, reports[-1].step) == ("1/3", "2/3")
    assert reports[0].eta_s is None and all(p.eta_s > 0 for p in reports[1:])  # known once a step has run
    assert (
        list(store.versions("shapes-classify")) == [1] and list(store.versions("shapes-detect")) == []
    )  # stopped mid-task: nothing half-written
    assert lines[1] == "demo: task 1/3, shapes-classify" and any(
        re.match(r"demo: task 2/3, shapes-detect; about \d+ s left", x) for x in lines
    )
    assert "epoch 1 (step 2/2)" in "\n".join(lines) and "/1000" not in "\n".join(lines)  # steps of the run, not epochs of 1000


@pytest.mark.process
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_demo_server_answers_probes_while_it_trains(tmp_path, workers):
    """Live at once, ready 503 saying which demo task trains and the time left, then ready; under two front ends too."""
    server = ServerProcess("random", tmp_path / "store", "--demo", "--demo-steps", "6", "--demo-data", str(tmp_path / "demo"),
                           env={"MONASERVE_WORKERS": workers}, log=tmp_path / "server.log", launcher=REDUCED)  # fmt: skip
    try:
        seen, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                live, ready = httpx.get(server.url + "/health/live", timeout=2), httpx.get(server.url + "/health/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            assert live.status_code == 200
            if ready.status_code == 200:
                break
            assert ready.status_code == 503
            seen.append(ready.json())
            time.sleep(0.05)
        assert ready.status_code == 200, server.log()
        training = [body for body in seen if body.get("activity") == "training demo"]
        assert training and {body["status"] for body in training} == {"loading"}, seen
        assert {body["step"] for body in training} <= {"1/3", "2/3", "3/3"} and len({body["step"] for body in training}) >= 2, seen
        assert any(body.get("eta_s", 0) > 0 for body in training), seen
        assert re.search(r"demo: task 3/3, shapes-segment; about \d+ (s|min) left in all", server.log())
        assert {task["name"] for task in server.client().get("/v1/tasks").json()} == set(DEMO_TASKS)
    finally:
        server.stop()


@pytest.mark.process
def test_a_server_stopped_while_its_demo_trains_exits_at_once(tmp_path):
    server = ServerProcess("random", tmp_path / "store", "--demo", "--demo-data", str(tmp_path / "demo"),
                           log=tmp_path / "server.log", launcher=REDUCED)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health/ready", timeout=2).json().get("activity") == "training demo":
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    assert server.process.poll() is None, server.log()
    assert server.stop(signal.SIGTERM, timeout=30) == 0, server.log()  # the training ends at its next step, not after 3 tasks
    assert "start-up failed" not in server.log() and "Traceback" not in server.log()
