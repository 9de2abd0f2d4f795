"""The adapter registry: catalog of tasks and versions, CPU cache, device slots, and hot-loading.

All state lives on the event loop's thread and changes only there, so no locks are needed; file reads,
validation and installs into the engine run in executors and hand their results back to the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from monaserve.adapters import AdapterError, AdapterPackage, Manifest, check_compatible, validate_task_name

from .cache import LRUBytesCache
from .engine import Engine
from .errors import (
    AdapterTooLarge,
    BadRequest,
    Overloaded,
    TaskUnloaded,
    UnknownTask,
    UnknownVersion,
    WrongKind,
)
from .metrics import Metrics
from .store import AdapterStore

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[str, int]
Location = Literal["gpu", "cpu", "store"]


@dataclass(frozen=True)
class VersionInfo:
    manifest: Manifest
    nbytes: int


@dataclass
class TaskEntry:
    """One task in the catalog: its stored versions and the version unpinned requests get."""

    name: str
    versions: dict[int, VersionInfo]
    serving: int
    enabled: bool = True


@dataclass
class Resident:
    """A task version installed in a device slot; `refs` counts requests whose batches may use it."""

    slot: int
    nbytes: int
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    evict_when_idle: bool = False


@dataclass(frozen=True)
class Lease:
    """A request's hold on a slot: the slot stays put until the lease is released."""

    task: str
    version: int
    slot: int
    manifest: Manifest


class Registry:
    def __init__(
        self,
        store: AdapterStore,
        engine: Engine,
        loader: Executor,
        metrics: Metrics,
        cpu_cache_bytes: int,
        gpu_budget_bytes: int | None = None,
        admission_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.engine = engine
        self.loader = loader
        self.metrics = metrics
        self.cpu_cache: LRUBytesCache[AdapterPackage] = LRUBytesCache(cpu_cache_bytes)
        self.gpu_budget_bytes = gpu_budget_bytes
        self.admission_timeout_s = admission_timeout_s
        self.catalog: dict[str, TaskEntry] = {}
        self.residents: dict[Key, Resident] = {}
        self.free_slots = list(range(engine.num_slots))
        self._known: dict[Key, VersionInfo] = {}
        self._loading: dict[Key, asyncio.Task] = {}
        self._uploading: set[Key] = set()
        self._slot_freed = asyncio.Event()
        metrics.slots_total.set(engine.num_slots)
        metrics.budget_bytes.set(gpu_budget_bytes or 0)

    # ---- catalog -------------------------------------------------------------------------------

    def _read_task(self, task: str) -> dict[int, VersionInfo]:
        """Versions of `task` in the store (runs in a thread). Unreadable files are logged and skipped."""
        infos = {}
        for version in self.store.versions(task):
            key = (task, version)
            info = self._known.get(key)
            if info is None:
                try:
                    info = VersionInfo(self.store.manifest(task, version), self.store.size(task, version))
                except (AdapterError, OSError) as exc:
                    self.metrics.store_errors.inc()
                    log.error("store: skipping %s/%s.safetensors: %s", task, version, exc)
                    continue
                self._known[key] = info
            infos[version] = info
        return infos

    def _apply(self, task: str, infos: dict[int, VersionInfo]) -> TaskEntry | None:
        """Merge a fresh read of `task` into the catalog; a new newest version becomes the serving one
        (but not one this server is still uploading: that one switches over once it is in a slot)."""
        entry = self.catalog.get(task)
        if not infos:
            self.catalog.pop(task, None)
            return None
        if entry is None:
            entry = self.catalog[task] = TaskEntry(task, infos, serving=max(infos))
            return entry
        new = infos.keys() - entry.versions.keys() - {v for t, v in self._uploading if t == task}
        entry.versions = infos
        if (new and max(new) > entry.serving) or entry.serving not in infos:
            entry.serving = max(infos)
        return entry

    async def refresh(self) -> None:
        """Re-read the whole store into the catalog."""
        tasks = await asyncio.to_thread(self.store.tasks)
        for task in set(tasks) | self.catalog.keys():
            self._apply(task, await asyncio.to_thread(self._read_task, task))

    async def entry(self, task: str, version: int | None = None) -> TaskEntry:
        """The catalog entry for `task`, pulled from the store on a miss (also for an unknown version)."""
        try:
            validate_task_name(task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        entry = self.catalog.get(task)
        if entry is None or (version is not None and version not in entry.versions):
            entry = self._apply(task, await asyncio.to_thread(self._read_task, task))
        if entry is None:
            raise UnknownTask(f"unknown task {task!r}")
        return entry

    async def resolve(self, task: str, version: int | None = None, kind: str | None = None) -> tuple[int, Manifest]:
        """The version a request gets and its manifest; checks existence, loaded state and kind."""
        entry = await self.entry(task, version)
        if version is None:
            if not entry.enabled:
                raise TaskUnloaded(f"task {task!r} is unloaded; POST /v1/adapters/{task}/load to serve it again")
            version = entry.serving
        if version not in entry.versions:
            raise UnknownVersion(f"task {task!r} has no version {version}; versions: {sorted(entry.versions)}")
        manifest = entry.versions[version].manifest
        if kind is not None and manifest.kind != kind:
            raise WrongKind(f"task {task!r} is a {manifest.kind} task; use /v1/tasks/{task}/{manifest.kind}")
        return version, manifest

    def location(self, key: Key) -> Location:
        if key in self.residents:
            return "gpu"
        return "cpu" if key in self.cpu_cache else "store"

    # ---- serving -------------------------------------------------------------------------------

    async def acquire(self, task: str, version: int, manifest: Manifest) -> Lease:
        """Hold a slot with (task, version) in it, loading it first if needed."""
        key = (task, version)
        while True:
            await self.ensure_loaded(key)
            resident = self.residents.get(key)
            if resident is not None:  # else it was evicted between the load and now: load again
                resident.refs += 1
                resident.last_used = time.monotonic()
                return Lease(task, version, resident.slot, manifest)

    def release(self, lease: Lease) -> None:
        resident = self.residents.get((lease.task, lease.version))
        if resident is None:
            return
        resident.refs -= 1
        resident.last_used = time.monotonic()
        if resident.refs == 0:
            if resident.evict_when_idle:
                self._evict((lease.task, lease.version))
            self._slot_freed.set()

    async def ensure_loaded(self, key: Key) -> None:
        """Install `key` in a slot unless it is there; concurrent callers share one load."""
        if key in self.residents:
            return
        load = self._loading.get(key)
        if load is None:
            load = self._loading[key] = asyncio.ensure_future(self._load(key))
            load.add_done_callback(functools.partial(self._load_finished, key))
        await asyncio.shield(load)

    def _load_finished(self, key: Key, load: asyncio.Task) -> None:
        del self._loading[key]
        if not load.cancelled() and load.exception() is not None:  # retrieved here so none goes unnoticed
            log.warning("adapter load failed: %s", load.exception())

    async def _in_loader(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.loader, fn, *args)

    def _read_package(self, key: Key) -> AdapterPackage:
        package = AdapterPackage.from_bytes(self.store.read(*key))
        check_compatible(package, self.engine.backbone)
        return package

    async def _load(self, key: Key) -> None:
        started = time.monotonic()
        package = self.cpu_cache.get(key)
        if package is None:
            package = await self._in_loader(self._read_package, key)
            self._cache(key, package)
        head_values = sum(t.numel() for name, t in package.tensors.items() if name.startswith("head."))
        nbytes = self.engine.slot_nbytes + head_values * self.engine.dtype.itemsize
        slot = await self._admit(key, nbytes)
        try:
            await self._in_loader(self.engine.install, slot, package)
        except BaseException:
            self.free_slots.append(slot)
            self._slot_freed.set()
            raise
        self.residents[key] = Resident(slot=slot, nbytes=nbytes)
        self.metrics.adapter_loads.labels(key[0]).inc()
        self.metrics.adapter_load_seconds.observe(time.monotonic() - started)
        self._update_gauges()
        log.info("loaded %s v%s into slot %s (%.1f ms)", *key, slot, 1e3 * (time.monotonic() - started))

    def _cache(self, key: Key, package: AdapterPackage) -> None:
        self.cpu_cache.put(key, package, package.nbytes)
        self.metrics.cpu_cache_bytes.set(self.cpu_cache.nbytes)

    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self.residents.values())

    def _fits(self, nbytes: int) -> bool:
        budget_ok = self.gpu_budget_bytes is None or self.resident_bytes() + nbytes <= self.gpu_budget_bytes
        return bool(self.free_slots) and budget_ok

    async def _admit(self, key: Key, nbytes: int) -> int:
        """Take a free slot with room in the byte budget, evicting idle adapters (LRU) as needed."""
        if self.gpu_budget_bytes is not None and nbytes > self.gpu_budget_bytes:
            raise AdapterTooLarge(
                f"{key[0]!r} v{key[1]} needs {nbytes / 2**20:.1f} MiB on the device; "
                f"the adapter budget is {self.gpu_budget_bytes / 2**20:.1f} MiB"
            )
        deadline = time.monotonic() + self.admission_timeout_s
        while not self._fits(nbytes):
            idle = [k for k, r in self.residents.items() if r.refs == 0]
            if idle:
                self._evict(min(idle, key=lambda k: self.residents[k].last_used))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(
                    f"no adapter slot free for {key[0]!r}: all {self.engine.num_slots} slots are in use by in-flight requests",
                    retry_after_s=1,
                )
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), remaining)
            except TimeoutError:
                pass
        return self.free_slots.pop(0)

    def _evict(self, key: Key) -> None:
        resident = self.residents.pop(key)
        self.engine.evict(resident.slot)
        self.free_slots.append(resident.slot)
        self.metrics.adapter_evictions.labels(key[0]).inc()
        self._update_gauges()
        self._slot_freed.set()
        log.info("evicted %s v%s from slot %s", *key, resident.slot)

    def _update_gauges(self) -> None:
        self.metrics.slots_used.set(len(self.residents))
        self.metrics.resident_bytes.set(self.resident_bytes())

    # ---- administration ------------------------------------------------------------------------

    def _validate_upload(self, task: str, data: bytes) -> AdapterPackage:
        package = AdapterPackage.from_bytes(data)
        if package.manifest.name != task:
            raise AdapterError(f"the package is for task {package.manifest.name!r}, not {task!r}")
        check_compatible(package, self.engine.backbone)
        return package

    async def upload(self, task: str, data: bytes) -> Manifest:
        """Validate fully, store atomically, load into a slot, then switch unpinned requests to it."""
        try:
            validate_task_name(task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        package = await self._in_loader(self._validate_upload, task, data)
        key = (task, package.manifest.version)
        self._uploading.add(key)
        try:
            await asyncio.to_thread(self.store.write, task, key[1], data)
            info = self._known[key] = VersionInfo(package.manifest, len(data))
            entry = self.catalog.get(task)
            if entry is None:
                entry = self.catalog[task] = TaskEntry(task, {key[1]: info}, serving=key[1])
            entry.versions[key[1]] = info
            self._cache(key, package)
            await self.ensure_loaded(key)
        finally:
            self._uploading.discard(key)
        if not entry.enabled or key[1] > entry.serving:
            entry.serving = key[1]
        entry.enabled = True
        log.info("uploaded %s v%s (%d bytes); serving v%s", task, key[1], len(data), entry.serving)
        return package.manifest

    async def load(self, task: str, version: int | None = None) -> TaskEntry:
        """Load a stored version (default: the newest) into a slot and serve it to unpinned requests."""
        entry = await self.entry(task, version)
        version = max(entry.versions) if version is None else version
        if version not in entry.versions:
            raise UnknownVersion(f"task {task!r} has no version {version}; versions: {sorted(entry.versions)}")
        await self.ensure_loaded((task, version))
        entry.serving, entry.enabled = version, True
        return entry

    async def unload(self, task: str, purge: bool = False) -> None:
        """Stop serving `task`: free its slots (at once, or when in-flight requests finish) and its cache.

        With `purge`, delete every stored version too.
        """
        entry = await self.entry(task)
        entry.enabled = False
        for key in [k for k in self.residents if k[0] == task]:
            if self.residents[key].refs == 0:
                self._evict(key)
            else:
                self.residents[key].evict_when_idle = True
        for version in entry.versions:
            self.cpu_cache.pop((task, version))
        self.metrics.cpu_cache_bytes.set(self.cpu_cache.nbytes)
        if purge:
            await asyncio.to_thread(self.store.delete, task)
            for version in entry.versions:
                self._known.pop((task, version), None)
            self.catalog.pop(task, None)
