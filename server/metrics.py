"""Prometheus metrics for one server; in one process each server owns its registry, so instances never
share counters.

Under `--workers N` every process of the server writes its metrics to files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode, chosen by that variable before the library is first imported)
and any process's `/metrics` renders them all: counters and histograms summed, each gauge by the rule
it declares (`multiprocess_mode`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    Summary,
    generate_latest,
    multiprocess,
)
from prometheus_client.samples import Sample

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request, batching, adapter and memory metrics, all prefixed `monaserve_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if not self.shared:  # per-process figures; the multiprocess collector has no way to merge them
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._device_memory: Callable[[], float] | None = None
        r = self.registry
        self.requests = Counter(
            "monaserve_requests",
            "Inference requests by task, its kind, protocol (v1, v2, grpc) and HTTP status (gRPC's as the status it maps from).",
            ["task", "kind", "protocol", "status"],
            registry=r,
        )
        self.images = Counter("monaserve_images", "Images inferred, by task.", ["task"], registry=r)
        self.latency = Histogram(
            "monaserve_request_latency_seconds",
            "Request latency by task and stage (decode, queue, inference, total).",
            ["task", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("monaserve_batch_size", "Images per engine batch.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "monaserve_batch_seconds",
            "Engine time per batch: backbone, adapters, heads and the copy to the host.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tasks = Histogram("monaserve_batch_tasks", "Distinct adapter slots per engine batch.", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("monaserve_queue_depth", "Images waiting for the engine.", registry=r, multiprocess_mode="livesum")
        self.dropped_images = Counter(
            "monaserve_dropped_images",
            "Queued images never run: their request timed out, failed or its client left first.",
            registry=r,
        )
        self.adapter_loads = Counter("monaserve_adapter_loads", "Adapters installed into a device slot.", ["task"], registry=r)
        self.adapter_evictions = Counter("monaserve_adapter_evictions", "Adapters removed from a device slot.", ["task"], registry=r)
        self.adapter_load_seconds = Histogram(
            "monaserve_adapter_load_seconds", "Time from load start to a ready slot.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.store_errors = Counter(
            "monaserve_store_errors",
            "Adapter store failures: unusable files (each counted once) and failed catalog refreshes.",
            registry=r,
        )
        self.slots_total = Gauge(
            "monaserve_adapter_slots", "Adapter slots on the engine's device.", registry=r, multiprocess_mode="livesum"
        )
        self.slots_used = Gauge(
            "monaserve_adapter_slots_used", "Adapter slots holding an adapter.", registry=r, multiprocess_mode="livesum"
        )
        self.resident_bytes = Gauge(
            "monaserve_device_adapter_bytes",
            "Bytes of adapters resident on the device (slots in use plus heads).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.budget_bytes = Gauge(
            "monaserve_device_adapter_budget_bytes",
            "Device byte budget for adapters (0: no limit).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cpu_cache_bytes = Gauge(
            "monaserve_cpu_cache_bytes", "Bytes of packages in the CPU cache.", registry=r, multiprocess_mode="livesum"
        )
        self.device_memory = Gauge(
            "monaserve_device_memory_bytes", "Device memory allocated by the engine (CUDA only).", registry=r, multiprocess_mode="livesum"
        )
        # the statistics extension's figures (`model_stats.py`), per model (task) and version
        model = ["task", "version"]
        self.model_requests = Summary(
            "monaserve_model_request_seconds",
            "Inference requests that reached a version, by outcome (success, fail).",
            [*model, "outcome"],
            registry=r,
        )
        self.model_stages = Summary(
            "monaserve_model_stage_seconds",
            "Successful requests' time by stage: queue, compute_input (decode), compute_infer (batch), compute_output (answer).",
            [*model, "stage"],
            registry=r,
        )
        self.model_inferences = Counter("monaserve_model_inferences", "Images inferred, by task and version.", model, registry=r)
        self.model_executions = Counter("monaserve_model_executions", "Engine batches that ran a version's images.", model, registry=r)
        self.model_batches = Summary(
            "monaserve_model_batch_seconds", "Engine batch time by version and its images in the batch.", [*model, "batch_size"], registry=r
        )
        self.model_last_inference = Gauge(
            "monaserve_model_last_inference_ms", "When a version last answered (Unix time, ms).", model, registry=r, multiprocess_mode="max"
        )
        self.replica = Gauge(
            "monaserve_replica", "1, labelled with this replica's id.", ["replica"], registry=r, multiprocess_mode="livemax"
        )
        self.ready = Gauge(
            "monaserve_ready", "1 when the server is ready to serve (every process of it).", registry=r, multiprocess_mode="livemin"
        )

    def track_device_memory(self, read: Callable[[], float]) -> None:
        """Report `read()` as the device memory: at every scrape, and after every batch (what other processes show)."""
        self._device_memory = read

    def observe_batch(self, seconds: float) -> None:
        """One engine batch took `seconds`; the device memory it left allocated is sampled with it."""
        self.batch_seconds.observe(seconds)
        if self._device_memory is not None:
            self.device_memory.set(self._device_memory())

    def observe_model_success(self, task: str, version: int, images: int, stages: dict[str, float], seconds: float) -> None:
        """A request `task` v`version` answered: its `images`, its time by stage and in all."""
        labels = (task, str(version))
        self.model_requests.labels(*labels, "success").observe(seconds)
        for stage, stage_seconds in stages.items():
            self.model_stages.labels(*labels, stage).observe(stage_seconds)
        self.model_inferences.labels(*labels).inc(images)
        self.model_last_inference.labels(*labels).set(round(time.time() * 1000))

    def observe_model_failure(self, task: str, version: int, seconds: float) -> None:
        """A request for `task` v`version` failed after it was resolved, `seconds` after it started."""
        self.model_requests.labels(task, str(version), "fail").observe(seconds)

    def observe_model_batch(self, task: str, version: int, images: int, seconds: float) -> None:
        """An engine batch that held `images` of `task` v`version` ran in `seconds`."""
        labels = (task, str(version))
        self.model_executions.labels(*labels).inc()
        self.model_batches.labels(*labels, str(images)).observe(seconds)

    def render(self) -> bytes:
        """The text exposition: this process's metrics, or under `--workers` every process's."""
        if self._device_memory is not None:
            self.device_memory.set(self._device_memory())
        return generate_latest(self._collected())

    def samples(self, prefix: str) -> Iterator[Sample]:
        """Every sample whose name starts with `prefix`: this process's, or under `--workers` every process's."""
        for family in self._collected().collect():
            for sample in family.samples:
                if sample.name.startswith(prefix):
                    yield sample

    def _collected(self) -> CollectorRegistry:
        if not self.shared:
            return self.registry
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
