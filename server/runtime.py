"""The running server: configuration, start-up in the background, the inference path, and drain."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from monaserve.adapters import Backbone, Manifest
from monaserve.adapters.swin import resolve_device
from monaserve.adapters.transforms import Prepared

from .decoding import Decoder, large_image_lane
from .engine import Engine
from .errors import NotReady, Timeout
from .images import ImageLimits
from .metrics import Metrics
from .registry import Registry
from .scheduler import Job, Scheduler
from .store import AdapterStore

log = logging.getLogger(__name__)
MiB = 2**20


@dataclass
class ServeConfig:
    """Every `monaserve serve` option (each also read from `MONASERVE_<NAME>`)."""

    backbone: str = "swin_tiny_patch4_window7_224"
    weights: str = "hub"
    seed: int = 0
    store: str = "var/adapters"
    device: str = "auto"
    gpu_slots: int = 16
    gpu_adapter_mb: float | None = None
    cpu_cache_mb: float = 1024.0
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 512
    request_timeout_s: float = 30.0
    preload: str = ""
    admin_token: str | None = None
    insecure_admin: bool = False
    api_token: str | None = None
    cors_origins: str = ""
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000
    max_images_per_request: int = 64
    max_request_mb: float = 64.0
    max_body_buffer_mb: float = 256.0
    max_response_mb: float = 64.0
    max_connections: int = 2048
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: float = 1024.0
    keep_alive_s: float = 75.0
    decode_threads: int = 4
    drain_delay_s: float = 0.0
    catalog_refresh_s: float = 10.0
    replica_id: str = "monaserve"

    def check(self) -> None:
        """Refuse settings that cannot be meant: empty tokens, and limits that are not positive."""
        for flag, token in (("--admin-token (MONASERVE_ADMIN_TOKEN)", self.admin_token), ("--api-token (MONASERVE_API_TOKEN)", self.api_token)):
            if token is not None and not token.strip():
                raise ValueError(f"{flag} is set but empty: give a token (e.g. `openssl rand -hex 32`) or leave it unset")
        limits = ("max_request_pixels", "max_images_per_request", "max_request_mb", "max_body_buffer_mb", "max_response_mb",
                  "max_connections", "header_timeout_s", "body_timeout_s", "request_timeout_s", "keep_alive_s", "decode_threads")
        for name in limits:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.body_min_rate < 0:
            raise ValueError(f"--body-min-rate must be 0 (off) or positive, got {self.body_min_rate}")



@dataclass(frozen=True)
class Inference:
    """One request's outputs, all from one adapter version."""

    manifest: Manifest
    version: int
    outputs: list[torch.Tensor]
    prepared: list[Prepared]
    timings_s: dict[str, float]


class Runtime:
    """Owns the engine, registry and scheduler and the threads they run on."""

    def __init__(self, config: ServeConfig, on_fatal: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.on_fatal = on_fatal
        self.metrics = Metrics()
        self.state: Literal["loading", "ready", "draining", "failed"] = "loading"
        self.error: str | None = None
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.large_image_lane = large_image_lane()
        self.decoder = Decoder(
            ImageLimits(config.max_image_bytes, config.max_image_pixels, config.max_request_pixels), self.decode_pool, self.large_image_lane
        )
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.engine: Engine | None = None
        self.registry: Registry | None = None
        self.scheduler: Scheduler | None = None
        self._scheduler_task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        self.metrics.replica.labels(config.replica_id).set(1)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Load the backbone, warm it, read the store, preload; then turn ready. Failure is fatal."""
        config = self.config
        try:
            started = time.monotonic()
            device = resolve_device(config.device)
            backbone = await asyncio.to_thread(Backbone.load, config.backbone, config.weights, config.seed)
            self.engine = await asyncio.to_thread(Engine, backbone, config.gpu_slots, device)
            await asyncio.get_running_loop().run_in_executor(self.worker, self.engine.warmup)
            if device.type == "cuda":
                self.metrics.track_device_memory(lambda: torch.cuda.memory_allocated(device))
            budget = None if config.gpu_adapter_mb is None else int(config.gpu_adapter_mb * MiB)
            self.registry = Registry(
                AdapterStore(config.store),
                self.engine,
                self.loader,
                self.metrics,
                cpu_cache_bytes=int(config.cpu_cache_mb * MiB),
                gpu_budget_bytes=budget,
                admission_timeout_s=config.request_timeout_s,
            )
            await self.registry.refresh()
            self.scheduler = Scheduler(
                self.engine.run,
                self.worker,
                self.metrics,
                max_batch=config.max_batch,
                max_delay_s=config.max_delay_ms / 1000,
                max_queue=config.max_queue,
            )
            self._scheduler_task = asyncio.create_task(self.scheduler.run())
            self._scheduler_task.add_done_callback(self._scheduler_stopped)
            await self._preload()
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")
            self.on_fatal()
            return
        if config.catalog_refresh_s > 0:
            self._refresh_task = asyncio.create_task(self._refresh_catalog())
        gc.collect()
        gc.freeze()  # what start-up built lives as long as the process: no collection walks it again
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info(
            "ready: %s on %s (%s), %d slots, %d tasks in %s, %.1f s",
            backbone.name, device, self.engine.dtype, config.gpu_slots, len(self.registry.catalog), config.store,
            time.monotonic() - started,
        )

    def _scheduler_stopped(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.state, self.error = "failed", f"scheduler stopped: {task.exception()!r}"
            self.metrics.ready.set(0)
            log.error("the scheduler stopped", exc_info=task.exception())
            self.on_fatal()

    async def _refresh_catalog(self) -> None:
        """Re-read the store every `catalog_refresh_s`: other replicas' uploads and purges show up here."""
        while True:
            await asyncio.sleep(self.config.catalog_refresh_s)
            try:
                await self.registry.refresh()
            except Exception as exc:  # a store outage must not stop serving what is loaded
                self.metrics.store_errors.inc()
                log.error("catalog refresh failed: %s", exc)

    async def _preload(self) -> None:
        wanted = self.config.preload.strip()
        if not wanted:
            return
        tasks = sorted(self.registry.catalog) if wanted == "all" else [t.strip() for t in wanted.split(",") if t.strip()]
        for task in tasks:
            try:
                await self.registry.load(task)
            except Exception as exc:
                log.error("preload of %r failed: %s", task, exc)

    def begin_drain(self) -> None:
        """Readiness goes false so load balancers stop sending; requests that still arrive are served."""
        if self.state == "ready":
            self.state = "draining"
            self.metrics.ready.set(0)

    async def stop(self) -> None:
        """Finish what is queued, then stop the threads."""
        self.begin_drain()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self.scheduler is not None:
            self.scheduler.close()
            await asyncio.gather(self._scheduler_task, return_exceptions=True)  # a failure was logged already
        for pool in (self.decode_pool, self.large_image_lane, self.loader, self.worker):
            pool.shutdown(wait=True, cancel_futures=True)

    def require_ready(self) -> None:
        if self.state == "loading":
            raise NotReady("the server is still loading its backbone", retry_after_s=5)
        if self.state not in ("ready", "draining"):
            raise NotReady(f"the server is {self.state}", retry_after_s=1)

    async def infer(self, task: str, kind: str | None, images: list[bytes | np.ndarray], version: int | None = None) -> Inference:
        """Run `images` (encoded files, or `(H, W, 3)` uint8 pixels) through `task`, one version for all of
        them, within the request timeout. `kind` None accepts the task's own kind."""
        self.require_ready()
        timeout = self.config.request_timeout_s
        started = time.monotonic()
        pinned = version is not None
        try:
            async with asyncio.timeout(timeout):
                version, manifest = await self.registry.resolve(task, version, kind)
                prepared = await self.decoder.prepare(images, manifest.input)
                decoded = time.monotonic()
                lease = await self.registry.acquire(task, version, manifest, pinned)
                job = Job(
                    [p.tensor for p in prepared],
                    lease.slot,
                    on_settled=functools.partial(self.registry.release, lease),
                    future=asyncio.get_running_loop().create_future(),
                )
                try:
                    self.scheduler.submit(job)
                except BaseException:
                    self.registry.release(lease)
                    raise
                outputs = await job.future
        except TimeoutError:
            raise Timeout(f"request for {task!r} did not finish within {timeout:g} s") from None
        total = time.monotonic() - started
        timings = {"decode": decoded - started, "queue": job.queue_s, "inference": job.inference_s, "total": total}
        for stage, seconds in timings.items():
            self.metrics.latency.labels(task, stage).observe(seconds)
        self.metrics.images.labels(task).inc(len(images))
        return Inference(lease.manifest, lease.version, outputs, prepared, timings)
