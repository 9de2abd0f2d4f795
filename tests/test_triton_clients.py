"""Triton's own Python clients, HTTP and gRPC, against a real server as one process and as two front
ends (gRPC in each front end, repository calls passed to the engine process): every call they make
works, and both protocols answer alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server_harness import TOKEN, image_bytes, serve_tasks

pytestmark = [pytest.mark.process, pytest.mark.both_ways]
SESSION = Path(__file__).with_name("triton_client_session.py")


def test_tritons_clients_work_unchanged_over_both_protocols(tmp_path_factory, tiny_weights, shared_backbone, front_ends, tmp_path):
    try:
        import tritonclient  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("needs tritonclient (the dev extra)")
    image = tmp_path / "cat.jpg"
    image.write_bytes(image_bytes(5))
    with serve_tasks(tmp_path_factory, tiny_weights, shared_backbone, {"pets": "classify"}, input_size=64) as server:
        done = subprocess.run(
            [sys.executable, str(SESSION), f"127.0.0.1:{server.port}", server.grpc_target, TOKEN, str(image)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:] + server.log()[-3000:]
    seen = json.loads(done.stdout)
    for protocol, answers in seen.items():
        assert answers["live"] and answers["ready"] and answers["model_ready"], protocol
        assert {"classification", "statistics", "model_configuration", "model_repository"} <= set(answers["extensions"])
        assert answers["inputs"] == ["image"] and int(answers["max_batch_size"]) == 0
        assert len(answers["labels"]) == 2 and len(answers["labels"][0]) == 3
        assert [len(c) for c in answers["classes"]] == [2, 2] and all(c.count(":") == 2 for row in answers["classes"] for c in row)
        assert answers["index"] == [["pets", "1", "READY"]]
        assert answers["ready_after_unload"] is False and answers["ready_after_load"] is True
    http, grpc = seen["http"], seen["grpc"]
    assert http["labels"] == grpc["labels"] and http["classes"] == grpc["classes"]
    assert np.allclose(http["scores"], grpc["scores"])
    assert grpc["successes"] == http["successes"] + 2, "statistics count both protocols' requests, whichever front end served them"
