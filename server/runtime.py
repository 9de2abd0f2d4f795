"""The running server: its parts and threads, start-up in the background, and drain."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from monaserve.adapters import Backbone
from monaserve.adapters.swin import resolve_device

from .config import ServeConfig
from .decoding import Decoder, jpeg_device, large_image_lane
from .engine import Engine
from .engine_client import EngineClient, LocalEngine
from .errors import NotReady
from .images import ImageLimits
from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler
from .store import AdapterStore

log = logging.getLogger(__name__)
MiB = 2**20


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
        self.device = resolve_device(config.device)
        self.decoder = Decoder(
            ImageLimits(config.max_image_bytes, config.max_image_pixels, config.max_request_pixels),
            self.decode_pool,
            self.large_image_lane,
            jpeg_device(config.jpeg_decode, self.device),
        )
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.engine: Engine | None = None
        self.registry: Registry | None = None
        self.scheduler: Scheduler | None = None
        self.engine_client: EngineClient | None = None
        self._scheduler_task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        self.metrics.replica.labels(config.replica).set(1)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Load the backbone, warm it, read the store, preload; then turn ready. Failure is fatal."""
        config = self.config
        try:
            started = time.monotonic()
            device = self.device
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
            self.engine_client = LocalEngine(self.registry, self.scheduler)
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
            backbone.name,
            device,
            self.engine.dtype,
            config.gpu_slots,
            len(self.registry.catalog),
            config.store,
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
