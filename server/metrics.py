"""Prometheus metrics for one server; each server owns its registry so instances never share counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request, batching, adapter and memory metrics, all prefixed `monaserve_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "monaserve_requests", "Inference requests by task, kind and HTTP status.", ["task", "kind", "status"], registry=r
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
        self.queue_depth = Gauge("monaserve_queue_depth", "Images waiting for the engine.", registry=r)
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
        self.slots_total = Gauge("monaserve_gpu_slots", "Adapter slots on the device.", registry=r)
        self.slots_used = Gauge("monaserve_gpu_slots_used", "Adapter slots holding an adapter.", registry=r)
        self.resident_bytes = Gauge(
            "monaserve_gpu_adapter_bytes", "Bytes of adapters resident on the device (slots in use plus heads).", registry=r
        )
        self.budget_bytes = Gauge("monaserve_gpu_adapter_budget_bytes", "Device byte budget for adapters (0: no limit).", registry=r)
        self.cpu_cache_bytes = Gauge("monaserve_cpu_cache_bytes", "Bytes of packages in the CPU cache.", registry=r)
        self.device_memory = Gauge("monaserve_device_memory_bytes", "Device memory allocated by the engine (CUDA only).", registry=r)
        self.replica = Gauge("monaserve_replica", "1, labelled with this replica's id.", ["replica"], registry=r)
        self.ready = Gauge("monaserve_ready", "1 when the server is ready to serve.", registry=r)

    def track_device_memory(self, read: Callable[[], float]) -> None:
        self.device_memory.set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
