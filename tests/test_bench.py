"""The benchmarks run end to end at toy sizes and write the results they promise (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "MONASERVE_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--device", "cpu", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = tmp_path.glob("*.json")
    result = json.loads(written.read_text())
    environment = result["environment"]
    assert environment["device_type"] == "cpu" and environment["torch"] and environment["timm"]
    assert script in environment["command"] and "--device cpu" in environment["command"]
    assert "| " in done.stdout  # the Markdown table
    return result


def test_engine_bench(tmp_path):
    result = run_bench("engine_bench.py", tmp_path, "--batch", "2", "--tasks", "2", "--rounds", "1", "--no-compile")
    variants = {v["variant"]: v for v in result["variants"]}
    assert set(variants) == {"plain", "reference", "folded", "mixed-2", "mixed-2 per-sample", "loop-2"}
    assert variants["plain"]["ratio_to_plain"] == 1.0
    assert all(v["images_per_s"] > 0 and v["ratio_to_plain"] > 0 for v in variants.values())


def test_capacity_bench(tmp_path):
    result = run_bench(
        "capacity_bench.py", tmp_path, "--backbone", "swin_tiny_patch4_window7_224", "--slots", "2", "--batch", "2",
        "--switches", "1", "--labels", "10",
    )
    math = result["memory_math_bf16"]
    assert math["per_task_bytes"] == math["slot_bytes"] + math["head_bytes"]
    assert math["tasks_resident"] > 10 * math["naive_tasks_resident"] > 0
    assert set(result["switch"]) == {"weights_into_resident", "new_full_model", "adapter_into_slot"}


def test_serve_bench(tmp_path):
    result = run_bench("serve_bench.py", tmp_path, "--tasks", "1,2", "--duration", "2", "--hot-loads", "1", "--concurrency", "2")
    assert [p["tasks"] for p in result["phases"]] == [1, 2]
    for phase in result["phases"]:
        assert phase["ok"] > 0 and phase["errors"] == {}
        assert phase["engine_images_per_s"] > 0 and phase["end_to_end_fraction"] > 0
    assert result["hot_load"]["upload_to_served_ms"]["p50"] > 0
    assert result["memory"]["slots_used"] == 2  # the two bench tasks, listed before the hot-load phase
