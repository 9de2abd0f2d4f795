"""The first-run demo trains its three tasks once per backbone, into the store the server reads, while the
server already answers probes and says how far the training is."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys
import threading
import time

import httpx
import pytest

from monaserve.server.config import ServeConfig
from monaserve.server.demo import DEMO_TASKS, DemoStopped, ensure_demo, missing_demo_tasks
from monaserve.server.errors import NotReady
from monaserve.server.front_end import FrontEndRuntime
from monaserve.server.health import HealthEndpoints
from monaserve.server.lifecycle import Progress
from monaserve.server.run_dir import RunDir
from monaserve.server.runtime import Runtime
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


def test_front_ends_answer_readiness_with_the_engine_processs_progress(tmp_path):
    """Under --workers the engine process's runtime publishes each step of its start-up (the demo's
    training, say) to the run folder, and every front end's readiness answers with it. (One process:
    the README's server in tests/test_docs_examples.py, watched while its demo trains.)"""
    config = ServeConfig(weights="random", store=str(tmp_path / "store"), workers=2, demo=True)
    run = RunDir.make(config)
    engine = Runtime(config, publish=run.write_progress)  # as `workers.run_engine` makes it
    front_end = FrontEndRuntime(config, run, 0)
    try:
        answer = asyncio.run(HealthEndpoints(front_end).ready())
        assert answer.status_code == 503 and json.loads(answer.body)["activity"] == "waiting for the engine process"
        engine.report(Progress("training demo", "2/3", 95.0))
        answer = asyncio.run(HealthEndpoints(front_end).ready())
        assert json.loads(answer.body) == {"status": "loading", "activity": "training demo", "step": "2/3", "eta_s": 95.0}
        with pytest.raises(NotReady, match=r"still starting: training demo \(2/3, about 2 min left\)"):
            front_end.require_ready()
    finally:
        for runtime in (engine, front_end):
            asyncio.run(runtime.stop())
        shutil.rmtree(run.path)


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
