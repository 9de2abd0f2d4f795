"""The running server: its parts and threads, start-up in the background, and drain."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import torch

from monaserve.adapters import Backbone
from monaserve.adapters.swin import BackboneError, resolve_device

from .budgets import Tally
from .catalog import Catalog, TaskLookup
from .compile import use_compile_cache
from .config import ServeConfig
from .decoding import Decoder, jpeg_device, large_image_lane
from .engine import Engine
from .engine_client import EngineClient, LocalEngine
from .images import ImageLimits
from .lifecycle import Lifecycle, Progress, State
from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler
from .store import AdapterStore

if TYPE_CHECKING:
    from .remote_engine import EngineService

log = logging.getLogger(__name__)
MiB = 2**20


class AnyRuntime(Protocol):
    """What the app needs of a process's runtime: this module's `Runtime` (the engine in this process),
    or a front-end process's (`front_end.FrontEndRuntime`, the engine in another)."""

    config: ServeConfig
    metrics: Metrics
    state: State
    error: str | None
    decoder: Decoder
    decode_pool: Executor
    engine_client: EngineClient | None
    registry: Registry | None
    admin_socket: str | None
    """Where admin calls go instead of this process (the engine process's private HTTP socket), or None."""

    @property
    def ready(self) -> bool: ...
    @property
    def progress(self) -> Progress: ...
    @property
    def catalog(self) -> TaskLookup | None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def begin_drain(self) -> None: ...
    def require_ready(self) -> None: ...
    def new_tally(self) -> Tally: ...


def image_decoder(config: ServeConfig, device: torch.device, pool: Executor, large_lane: Executor) -> Decoder:
    """The decoder `config` asks for, JPEGs decoded on `device` or with Pillow (`--jpeg-decode`)."""
    limits = ImageLimits(config.max_image_bytes, config.max_image_pixels, config.max_request_pixels)
    return Decoder(limits, pool, large_lane, jpeg_device(config.jpeg_decode, device))


class Runtime(Lifecycle):
    """Owns the engine, registry and scheduler and the threads they run on.

    Under `--workers` this is the engine process's runtime: `peers` (its `EngineService`) opens to the
    front-end processes once the runtime is ready, and hears of every admin change.
    """

    admin_socket = None  # admin calls are answered here

    def __init__(
        self,
        config: ServeConfig,
        on_fatal: Callable[[], None] = lambda: None,
        peers: EngineService | None = None,
        publish: Callable[[Progress], None] = lambda _: None,
    ) -> None:
        super().__init__(config, on_fatal)
        self.peers = peers
        self.publish = publish
        """Where start-up's progress goes besides this process's readiness (the front ends', under `--workers`)."""
        self._stopping = threading.Event()
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.large_image_lane = large_image_lane()
        self.device = resolve_device(config.device)
        self.decoder = image_decoder(config, self.device, self.decode_pool, self.large_image_lane)
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.engine: Engine | None = None
        self.registry: Registry | None = None
        self.scheduler: Scheduler | None = None
        self.engine_client: EngineClient | None = None
        self._scheduler_task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None

    @property
    def catalog(self) -> Catalog | None:
        return None if self.registry is None else self.registry.catalog

    def report(self, progress: Progress) -> None:
        super().report(progress)
        self.publish(progress)

    async def start(self) -> None:
        """Load the backbone, train the demo (`--demo`, where the store lacks it), warm the engine, read the
        store, preload; then turn ready, reporting each step to readiness. Failure is fatal."""
        config = self.config
        try:
            started = time.monotonic()
            device = self.device
            self.report(Progress("loading backbone"))
            backbone = await asyncio.to_thread(Backbone.load, config.backbone, config.weights, config.seed)
            if config.demo:
                await self._train_demo(backbone.fingerprint)
            self.report(Progress("building engine"))
            if config.compiled:
                use_compile_cache(config.compile_cache)
            self.engine = await asyncio.to_thread(
                Engine,
                backbone,
                config.gpu_slots,
                device,
                max_batch=config.max_batch,
                compile=config.compiled,
                mona_kernel=config.mona_kernel,
            )
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
            self.report(Progress("reading the store"))
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
            await self._prepare_input_sizes()
            if self.peers is not None:
                self.registry.announce = self.peers.changed
                await self.peers.start(self.engine_client, self.registry.catalog)
        except Exception as exc:
            if isinstance(exc, BackboneError):  # weights that cannot be had, and the message says the fix: one line
                log.error("start-up failed: %s", exc)
            else:
                log.exception("start-up failed")
            self.fail(f"{type(exc).__name__}: {exc}")
            return
        if config.catalog_refresh_s > 0:
            self._refresh_task = asyncio.create_task(self._keep_fresh())
        self.turn_ready()
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

    async def _train_demo(self, fingerprint: str) -> None:
        """`--demo`: train the demo tasks the store lacks for these weights, off the event loop (probes are answered)."""
        from . import demo

        config = self.config
        await asyncio.to_thread(
            demo.ensure_demo,
            AdapterStore(config.store),
            config.backbone,
            config.weights,
            config.seed,
            config.demo_data,
            steps=config.demo_steps,
            progress=False,
            say=demo.log.info,
            report=self.report,
            stop=self._stopping,
            fingerprint=fingerprint,
        )

    async def _keep_fresh(self) -> None:
        """Re-read the store every `catalog_refresh_s`: other replicas' uploads and purges show up here; a
        store outage is logged and counted and never stops serving what is loaded."""
        while True:
            await asyncio.sleep(self.config.catalog_refresh_s)
            try:
                await self.registry.refresh()
            except Exception as exc:
                self.metrics.store_errors.inc()
                log.error("catalog refresh failed: %s", exc)

    def _scheduler_stopped(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the scheduler stopped", exc_info=task.exception())
            self.fail(f"scheduler stopped: {task.exception()!r}")

    async def _preload(self) -> None:
        wanted = self.config.preload.strip()
        if not wanted:
            return
        self.report(Progress("preloading adapters"))
        tasks = sorted(self.registry.catalog) if wanted == "all" else [t.strip() for t in wanted.split(",") if t.strip()]
        for task in tasks:
            try:
                await self.registry.load(task)
            except Exception as exc:
                log.error("preload of %r failed: %s", task, exc)

    async def _prepare_input_sizes(self) -> None:
        """Warm (compiled: compile) every bucket at each input size the catalog's tasks use (an empty catalog:
        the backbone's), on the engine's thread; a task uploaded later with a new size compiles at its first batch."""
        catalog = self.registry.catalog
        sizes = {tuple(catalog[task].manifest.input.size) for task in catalog} or {self.engine.backbone.input_size}
        for index, size in enumerate(sorted(sizes)):
            self.report(Progress("compiling" if self.config.compiled else "warming up", f"{index + 1}/{len(sizes)} input sizes"))
            await asyncio.get_running_loop().run_in_executor(self.worker, self.engine.prepare, size)

    async def stop(self) -> None:
        """Finish what is queued, then stop the threads (and the demo's training, at its next step)."""
        self._stopping.set()
        self.begin_drain()
        if self.peers is not None:
            await self.peers.stop()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self.scheduler is not None:
            self.scheduler.close()
            await asyncio.gather(self._scheduler_task, return_exceptions=True)  # a failure was logged already
        for pool in (self.decode_pool, self.large_image_lane, self.loader, self.worker):
            pool.shutdown(wait=True, cancel_futures=True)
