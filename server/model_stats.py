"""The statistics extension (Triton's `/v2/models[/{m}[/versions/{v}]]/stats`, gRPC `ModelStatistics`): per
model version, requests that succeeded and failed, their cumulative time by stage, images and engine
batches, in Triton's terms and shape.

The figures are the server's Prometheus metrics (`Metrics.observe_model_*`), read back here: under
`--workers` the front ends' requests and the engine process's batches add up wherever they are read,
and `/metrics` shows the same counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .metrics import Metrics

NS = 1e9
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
"""Triton's stages of a successful request: waiting for a batch, decoding, the batch, post-processing and rendering."""
ZERO = {"count": 0, "ns": 0}


def duration(count: float, seconds: float) -> dict:
    """Triton's `StatisticDuration`: a count and the nanoseconds they took together."""
    return {"count": int(count), "ns": int(round(seconds * NS))}


def model_statistics(metrics: Metrics, models: Iterable[tuple[str, int]]) -> dict:
    """`{"model_stats": [...]}` for each (task, version) of `models`, in order, zeros where nothing ran."""
    found: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(float))
    for sample in metrics.samples("monaserve_model_"):
        labels = sample.labels
        if "task" not in labels or sample.name.endswith("_created"):
            continue
        facet = labels.get("outcome") or labels.get("stage") or labels.get("batch_size") or ""
        found[labels["task"], labels["version"]][sample.name, facet] += sample.value
    return {"model_stats": [_one_model(task, version, found.get((task, str(version)), {})) for task, version in models]}


def _one_model(task: str, version: int, values: dict) -> dict:
    def of(name: str, facet: str) -> dict:
        return duration(values.get((f"{name}_count", facet), 0), values.get((f"{name}_sum", facet), 0.0))

    sizes = sorted({int(facet) for name, facet in values if name == "monaserve_model_batch_seconds_count"})
    return {
        "name": task,
        "version": str(version),
        "last_inference": int(values.get(("monaserve_model_last_inference_ms", ""), 0)),
        "inference_count": int(values.get(("monaserve_model_inferences_total", ""), 0)),
        "execution_count": int(values.get(("monaserve_model_executions_total", ""), 0)),
        "inference_stats": {
            "success": of("monaserve_model_request_seconds", "success"),
            "fail": of("monaserve_model_request_seconds", "fail"),
            **{stage: of("monaserve_model_stage_seconds", stage) for stage in STAGES},
            "cache_hit": ZERO,
            "cache_miss": ZERO,
        },
        "response_stats": {},
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": ZERO,
                "compute_infer": of("monaserve_model_batch_seconds", str(size)),
                "compute_output": ZERO,
            }
            for size in sizes
        ],
        "memory_usage": [],
    }
