"""The benchmarks run end to end at toy sizes and write the results they promise (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_harness import require_tool

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "MONASERVE_BENCH_RESULTS": str(tmp_path), "TMPDIR": str(scratch)}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--device", "cpu", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(scratch.glob("monaserve-*")), "the benchmark left its work folders behind"
    (written,) = tmp_path.glob("*.json")
    result = json.loads(written.read_text())
    environment = result["environment"]
    assert environment["device_type"] == "cpu" and environment["torch"] and environment["timm"]
    assert script in environment["command"] and "--device cpu" in environment["command"]
    assert "| " in done.stdout  # the Markdown table
    return result


@pytest.mark.process
def test_frontend_bench(tmp_path):
    require_tool("wrk")
    args = ("--duration", "1", "--connections", "4", "--cases", "png-32", "--baseline", "HEAD")
    result = run_bench("frontend_bench.py", tmp_path, *args)
    assert result["health_floor"]["requests_per_s"] > 0 and result["baseline_health_floor"]["requests_per_s"] > 0
    assert [(c["case"], c["protocol"]) for c in result["cases"]] == [("png-32", "v1"), ("png-32", "v2")]
    for measured in [*result["cases"], *(c["baseline"] for c in result["cases"])]:  # this tree's server, and HEAD's
        assert measured["requests_per_s"] > 0 and measured["non_2xx"] == 0 and measured["p99_ms"] >= measured["p50_ms"]


@pytest.mark.process
def test_frontend_bench_with_the_real_engine_on_two_replicas_reports_the_engines_own_rate(tmp_path):
    require_tool("wrk")
    args = ("--engine", "real", "--replicas", "2", "--duration", "2", "--connections", "4", "--cases", "png-32", "--protocols", "v1")
    (case,) = run_bench("frontend_bench.py", tmp_path, *args)["cases"]
    assert len(case["per_replica"]) == 2 and case["requests_per_s"] == pytest.approx(sum(case["per_replica"]), abs=0.2)
    assert case["requests_per_s"] > 0 and case["engine_images_per_s"] > 0 and case["mean_batch"] >= 1
    assert case["end_to_end_fraction"] == pytest.approx(case["requests_per_s"] / case["engine_images_per_s"], rel=0.01)


@pytest.mark.process
def test_engine_bench(tmp_path):
    result = run_bench("engine_bench.py", tmp_path, "--batch", "2", "--tasks", "2", "--rounds", "1", "--no-compile")
    variants = {v["variant"]: v for v in result["variants"]}
    assert set(variants) == {"plain", "reference", "folded", "mixed-2", "loop-2"}
    assert variants["plain"]["ratio_to_plain"] == 1.0 and result["compiled"] is False
    assert all(v["images_per_s"] > 0 and v["ratio_to_plain"] > 0 for v in variants.values())
    mixed = variants["mixed-2"]
    assert mixed["ratio_to_one_task"] == pytest.approx(variants["folded"]["ms_per_batch"] / mixed["ms_per_batch"])
    assert variants["folded"]["ratio_to_one_task"] is None


@pytest.mark.process
def test_capacity_bench(tmp_path):
    result = run_bench(
        "capacity_bench.py",
        tmp_path,
        "--backbone",
        "swin_tiny_patch4_window7_224",
        "--slots",
        "2",
        "--batch",
        "2",
        "--switches",
        "1",
        "--labels",
        "10",
    )
    math = result["memory_math_bf16"]
    assert math["per_task_bytes"] == math["slot_bytes"] + math["head_bytes"]
    assert math["tasks_resident"] > 10 * math["naive_tasks_resident"] > 0
    assert set(result["switch"]) == {"weights_into_resident", "new_full_model", "adapter_into_slot"}


@pytest.mark.slow
def test_serve_bench(tmp_path):
    result = run_bench("serve_bench.py", tmp_path, "--tasks", "1,2", "--duration", "2", "--hot-loads", "1", "--concurrency", "2")
    assert [p["tasks"] for p in result["phases"]] == [1, 2]
    for phase in result["phases"]:
        assert phase["ok"] > 0 and phase["errors"] == {}
        assert phase["engine_images_per_s"] > 0 and phase["end_to_end_fraction"] > 0
    assert result["hot_load"]["upload_to_served_ms"]["p50"] > 0
    assert result["memory"]["slots_used"] == 2  # the two bench tasks, listed before the hot-load phase


@pytest.mark.slow
def test_load_with_adapter_churn_loses_nothing(tmp_path):
    """bench/churn.py at its full width (20 tasks) for 45 s, without its 10k-request soak: every answer
    is one the server may give, no answer mixes versions, the catalog ends as uploaded. (That is too
    short for RSS to level off; the soak's figures are in docs/reliability.md, and
    test_server_serving.py checks that repeated uploads and requests do not accumulate memory.)"""
    result = run_bench("churn.py", tmp_path, "--duration", "45", "--min-requests", "0")
    print("churn:", {k: result[k] for k in ("requests", "answers", "latency_ms", "admin", "versions_checked")}, result["memory"])
    assert result["requests"] > 300
    assert result["failures"] == 0, result["failure_examples"]
    assert result["torn_answers"] == 0 and result["versions_checked"] > 20
    assert result["catalog_problems"] == []
    admin = result["admin"]
    assert admin["upload"] > 20 and admin["unload"] > 10 and admin["reload"] == admin["unload"], admin
    assert all("failed" not in action for action in admin), admin
    assert result["memory"]["queue_depth"]["mean"] > 1  # the load kept the engine busy


def test_the_churn_checker_flags_answers_the_server_may_not_give():
    """bench/churn.py's `problem` on a made-up history: v2 uploaded during [10, 11], the task unloaded
    during [20, 21] and loaded back during [25, 26]."""
    sys.path.insert(0, str(BENCH))
    from churn import Answer, History, problem

    history = History("classify", uploads=[(1, 0.0, 0.0), (2, 10.0, 11.0)], unloads=[[20.0, 21.0, 25.0, 26.0]])

    def check(sent: float, received: float, status: int = 200, version: int | None = None, pinned: int | None = None, code: str = ""):
        return problem(Answer("t", pinned, [0], sent, received, status, code, version), history)

    assert check(9, 10.5, version=1) is None and check(9, 10.5, version=2) is None  # the switch overlapped
    assert check(12, 13, version=1) == "served v1; only v2..v2 existed and were served meanwhile"
    assert check(5, 6, version=2) is not None  # not uploaded yet
    assert check(12, 13, version=1, pinned=1) is None and check(12, 13, version=2, pinned=1) is not None
    assert check(22, 24, version=2) == "served while the task was unloaded"
    assert check(19, 20.5, version=2) is None  # sent before the unload was answered
    assert check(19, 20.5, status=404, code="task_unloaded") is None
    assert check(27, 28, status=404, code="task_unloaded") == "task_unloaded outside any unload window"
    assert check(22, 24, status=404, code="task_unloaded", pinned=1) is None  # an unloaded task serves no version
    assert check(22, 24, version=1, pinned=1) == "served while the task was unloaded"
    assert check(27, 28, status=404, code="task_unloaded", pinned=1) == "task_unloaded outside any unload window"
    assert check(1, 2, status=503, code="overloaded") is None
    assert check(1, 2, status=500, code="internal") == "500 internal"
    assert check(1, 2, status=0, code="ConnectError") is not None


@pytest.mark.slow
def test_attack_bench(tmp_path):
    """bench/attack.py's quick scenarios: the duplicated-output answer is refused, and big JSON bodies
    past the buffer budget get 503s (the other scenarios hold connections for minutes)."""
    result = run_bench("attack.py", tmp_path, "--only", "amplification,memory", "--label", "smoke")
    cases = result["scenarios"]["amplification"]["cases"]
    assert cases["oip: mask output listed 50 times"]["status"] == 400
    assert cases["v1: 8 4000x3000 JPEGs, rle=true"]["status"] == 200
    assert set(result["scenarios"]["memory"]["answers"]) <= {"200", "503"}


@pytest.mark.process
def test_grpc_bench(tmp_path):
    args = ("--duration", "1", "--rounds", "1", "--concurrency", "2", "--cases", "png-32")
    results = run_bench("grpc_bench.py", tmp_path, *args)["results"]
    assert [r["protocol"] for r in results] == ["rest", "grpc"]
    for measured in results:
        assert measured["requests_per_s"] > 0 and measured["failures"] == 0 and measured["p99_ms"] >= measured["p50_ms"]
    assert results[0]["server_cpu_ms_per_request"] > 0 and results[0]["server_cpu_vs_rest"] == 1.0
    assert results[0]["vs_rest"] == 1.0 and results[1]["vs_rest"] == pytest.approx(
        results[1]["requests_per_s"] / results[0]["requests_per_s"]
    )
