"""The adapter registry: catalog of tasks and versions, CPU cache, device slots, and hot-loading.

All state lives on the event loop's thread and changes only there, so no locks guard it; file reads,
validation and installs into the engine run in executors and hand their results back to the loop.
Admin calls on one task (upload, load, unload) run one at a time, in the order they came.

What each task serves (its pinned version, and whether it is unloaded) is kept in the store beside
its versions (`store.ServingState`), so every replica and every restart agrees.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from monaserve.adapters import AdapterError, AdapterPackage, Manifest, validate_task_name

from .cache import LRUBytesCache
from .engine import Engine
from .errors import (
    AdapterTooLarge,
    BadRequest,
    Overloaded,
    ServeError,
    TaskUnloaded,
    UnknownTask,
    UnknownVersion,
    VersionExists,
    WrongKind,
)
from .metrics import Metrics
from .store import AdapterStore, ServingState

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[str, int]
Location = Literal["gpu", "cpu", "store"]
STATE_KEY = 0
"""The version under which a task's unusable serving state file is remembered in `_broken`."""


@dataclass(frozen=True)
class VersionInfo:
    manifest: Manifest
    nbytes: int
    signature: str  # the stored file's; a different one means the version was purged and stored anew


@dataclass
class TaskEntry:
    """One task in the catalog: its stored versions and its serving state."""

    name: str
    versions: dict[int, VersionInfo]
    state: ServingState = ServingState()

    @property
    def serving(self) -> int:
        """The version unpinned requests get: the pinned one while it is stored, else the newest."""
        pinned = self.state.version
        return pinned if pinned in self.versions else max(self.versions)

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    def state_serving(self, version: int) -> ServingState:
        """The enabled state that serves `version`: pinned to it, or following the newest if it is the newest."""
        return ServingState(None if version == max(self.versions) else version, enabled=True)


@dataclass(eq=False)
class Resident:
    """A task version installed in a device slot; `refs` counts requests whose batches may use it."""

    key: Key
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
    manifest: Manifest
    resident: Resident

    @property
    def slot(self) -> int:
        return self.resident.slot


@dataclass(frozen=True)
class TaskRead:
    """One task as read from the store (see `Registry._read_task`)."""

    versions: dict[int, VersionInfo]
    broken: dict[Key, tuple[str, AdapterError]]
    state: ServingState
    state_signature: str | None


class Registry:
    """Which task versions exist (catalog), which are cached in RAM, and which sit in device slots.

    `residents` maps a task version to its current slot. A resident that must go while requests still
    use it (unload, purge) is marked `evict_when_idle`; a purged one also leaves `residents` at once so
    no new request finds its old weights.
    """

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
        self._reserved_bytes = 0
        self._known: dict[Key, VersionInfo] = {}
        self._broken: dict[Key, str] = {}  # stored files found unusable, by signature
        self._states: dict[str, tuple[str, ServingState]] = {}  # serving state files read, by signature
        self._admin_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loading: dict[Key, asyncio.Task] = {}
        self._generation: dict[str, int] = {}  # bumped by uploads and purges; store reads from before are stale
        self._purges: dict[str, int] = {}
        self._epochs: dict[Key, int] = {}  # bumped when a version's stored file leaves or changes
        self._retiring: set[Resident] = set()
        self._slot_freed = asyncio.Event()
        metrics.slots_total.set(engine.num_slots)
        metrics.budget_bytes.set(gpu_budget_bytes or 0)

    # ---- catalog -------------------------------------------------------------------------------

    def _read_task(self, task: str) -> TaskRead:
        """Versions and serving state of `task` in the store, and files newly found unusable with their
        signature and error (runs in a thread and changes nothing). Files known to be unusable are left
        out; a store that fails raises, so a passing outage never looks like a broken or deleted file."""
        infos, broken = {}, {}
        listing = self.store.listing(task)
        for version, stored in listing.versions.items():
            key = (task, version)
            if self._broken.get(key) == stored.signature:
                continue  # known to be unusable, and not replaced since
            info = self._known.get(key)
            if info is None or info.signature != stored.signature:
                try:
                    info = VersionInfo(self.store.manifest(task, version, stored.size), stored.size, stored.signature)
                except FileNotFoundError:
                    continue  # deleted since the listing
                except AdapterError as exc:
                    broken[key] = (stored.signature, exc)
                    continue
            infos[version] = info
        state, state_signature = ServingState(), None
        if listing.state is not None:
            state_signature = listing.state.signature
            known = self._states.get(task)
            if known is not None and known[0] == state_signature:
                state = known[1]
            else:
                try:
                    state = self.store.read_state(task)
                except FileNotFoundError:
                    state_signature = None  # removed since the listing
                except ValueError as exc:
                    broken[(task, STATE_KEY)] = (state_signature, AdapterError(f"its serving state is unusable ({exc}); serving the newest version"))
        return TaskRead(infos, broken, state, state_signature)

    def _mark_broken(self, key: Key, signature: str, error: Exception) -> None:
        """Remember a stored file as unusable until it is replaced; log and count it once."""
        if self._broken.get(key) == signature:
            return
        self._broken[key] = signature
        self.metrics.store_errors.inc()
        where = f"{key[0]}/serving.json" if key[1] == STATE_KEY else f"{key[0]}/{key[1]}.safetensors"
        log.error("store: skipping %s: %s", where, error)

    def _quarantine(self, key: Key, error: Exception) -> None:
        """A cataloged version whose file proved unusable when loaded (a corrupt body, another
        backbone): out of the catalog; unpinned requests move to the newest version left."""
        task, version = key
        entry = self.catalog.get(task)
        info = self._known.pop(key, None) or (entry.versions.get(version) if entry else None)
        if info is not None:
            self._mark_broken(key, info.signature, error)
        self._generation[task] = self._generation.get(task, 0) + 1  # store reads from before know no better
        if entry is None or version not in entry.versions:
            return
        del entry.versions[version]
        if not entry.versions:
            del self.catalog[task]

    async def _reread(self, task: str) -> TaskEntry | None:
        """Read `task` from the store and merge it into the catalog, unless an admin call on the task
        changed it meanwhile (then the read is stale and the catalog already knows better)."""
        generation = self._generation.get(task, 0)
        read = await asyncio.to_thread(self._read_task, task)
        for key, (signature, error) in read.broken.items():
            self._mark_broken(key, signature, error)
        if self._generation.get(task, 0) != generation:
            return self.catalog.get(task)
        infos = read.versions
        self._known.update(((task, version), info) for version, info in infos.items())
        if read.state_signature is None:
            self._states.pop(task, None)
        else:
            self._states[task] = (read.state_signature, read.state)
        entry = self.catalog.get(task)
        in_use = entry is not None and entry.enabled and (task, entry.serving) in self.residents
        if entry is not None:  # versions purged or replaced in the store (by this or another replica)
            gone = [v for v in entry.versions if v not in infos]
            replaced = [v for v, info in entry.versions.items() if v in infos and infos[v].signature != info.signature]
            self._forget(task, gone + replaced)
            for version in gone:
                self._known.pop((task, version), None)
        if not infos:
            self.catalog.pop(task, None)
            return None
        if entry is None:
            entry = self.catalog[task] = TaskEntry(task, infos, read.state)
            return entry
        previous, was_enabled = entry.serving, entry.enabled
        entry.versions, entry.state = infos, read.state
        if was_enabled and not entry.enabled:  # unloaded through another replica
            self._stop_serving(task, retire=False)
        elif in_use and entry.enabled and (entry.serving != previous or (task, entry.serving) not in self.residents):
            self._preload((task, entry.serving))  # the task is in use here: have its served version ready
        return entry

    def _forget(self, task: str, versions: list[int]) -> None:
        """Drop what this replica holds of versions whose stored file is gone or was replaced: slots
        (also ones still loading: their epoch moves on) and cached packages."""
        dropped = []
        for version in versions:
            key = (task, version)
            self._epochs[key] = self._epochs.get(key, 0) + 1
            if key in self.residents or key in self.cpu_cache:
                dropped.append(str(version))
            if key in self.residents:
                self._retire(self.residents[key])
            self.cpu_cache.pop(key)
        if dropped:
            self.metrics.cpu_cache_bytes.set(self.cpu_cache.nbytes)
            log.info("store: %s v%s left or changed in the store; dropped here", task, ",".join(dropped))

    def _preload(self, key: Key) -> None:
        """Load `key` in the background; a failure is logged (and retried by the next request)."""
        load = asyncio.ensure_future(self.ensure_loaded(key))
        load.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def refresh(self) -> None:
        """Re-read the whole store into the catalog."""
        await asyncio.to_thread(self.store.remove_stale_temp_files)
        tasks = await asyncio.to_thread(self.store.tasks)
        for task in set(tasks) | self.catalog.keys():
            await self._reread(task)

    async def entry(self, task: str, version: int | None = None) -> TaskEntry:
        """The catalog entry for `task`, pulled from the store on a miss (also for an unknown version)."""
        try:
            validate_task_name(task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        entry = self.catalog.get(task)
        if entry is None or (version is not None and version not in entry.versions):
            entry = await self._reread(task)
        if entry is None:
            raise UnknownTask(f"unknown task {task!r}")
        return entry

    async def resolve(self, task: str, version: int | None = None, kind: str | None = None) -> tuple[int, Manifest]:
        """The version a request gets and its manifest; checks existence, loaded state and kind."""
        entry = await self.entry(task, version)
        if not entry.enabled:  # pinned requests too: an unloaded task serves no version
            raise TaskUnloaded(f"task {task!r} is unloaded; POST /v1/adapters/{task}/load to serve it again")
        if version is None:
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

    async def acquire(self, task: str, version: int, manifest: Manifest, pinned: bool = True) -> Lease:
        """Hold a slot with (task, version) in it, loading it first if needed.

        Unless `pinned`, a version that left the store or proved unusable meanwhile gives way to the
        version the task serves now, if that takes the same input (the images are already prepared).
        """
        tried = set()
        while True:
            key = (task, version)
            try:
                await self.ensure_loaded(key)
            except UnknownVersion:
                tried.add(version)
                if pinned:
                    raise
                await self._reread(task)  # the store's truth, also about a file deleted meanwhile
                now, current = await self.resolve(task, None, manifest.kind)
                if now in tried or current.input != manifest.input:
                    raise
                version, manifest = now, current
                continue
            resident = self.residents.get(key)
            if resident is not None:  # else it was evicted between the load and now: load again
                resident.refs += 1
                resident.last_used = time.monotonic()
                return Lease(task, version, manifest, resident)

    def release(self, lease: Lease) -> None:
        resident = lease.resident
        resident.refs -= 1
        resident.last_used = time.monotonic()
        if resident.refs == 0:
            if resident.evict_when_idle:
                self._evict(resident)
            self._slot_freed.set()

    async def ensure_loaded(self, key: Key, package: AdapterPackage | None = None) -> None:
        """Install `key` in a slot unless it is there; concurrent callers share one load.

        Without `package` the package comes from the CPU cache or the store.
        """
        if key in self.residents:
            return
        load = self._loading.get(key)
        if load is None:
            load = self._loading[key] = asyncio.ensure_future(self._load(key, package))
            load.add_done_callback(functools.partial(self._load_finished, key))
        await asyncio.shield(load)

    def _load_finished(self, key: Key, load: asyncio.Task) -> None:
        del self._loading[key]
        if not load.cancelled() and load.exception() is not None:  # retrieved here so none goes unnoticed
            log.warning("adapter load failed: %s", load.exception())

    async def _in_loader(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.loader, fn, *args)

    def _read_package(self, key: Key) -> AdapterPackage:
        try:
            data = self.store.read(*key)
        except FileNotFoundError:
            raise UnknownVersion(f"task {key[0]!r} version {key[1]} is no longer in the store") from None
        package = AdapterPackage.from_bytes(data)
        if (package.manifest.name, package.manifest.version) != key:
            raise AdapterError(f"the file holds {package.manifest.name!r} v{package.manifest.version}")
        self.engine.check(package)
        return package

    async def _load(self, key: Key, package: AdapterPackage | None) -> None:
        started = time.monotonic()
        purges, epoch = self._purges.get(key[0], 0), self._epochs.get(key, 0)
        if package is None:
            package = self.cpu_cache.get(key)
            if package is None:
                try:
                    package = await self._in_loader(self._read_package, key)
                except AdapterError as exc:
                    self._quarantine(key, exc)
                    raise UnknownVersion(f"task {key[0]!r} version {key[1]} is unusable in the store: {exc}") from None
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
        finally:
            self._reserved_bytes -= nbytes
        resident = self.residents[key] = Resident(key, slot, nbytes)
        if self._purges.get(key[0], 0) != purges or self._epochs.get(key, 0) != epoch:
            self._retire(resident)  # purged or replaced while loading: these weights are gone
        self.metrics.adapter_loads.labels(key[0]).inc()
        self.metrics.adapter_load_seconds.observe(time.monotonic() - started)
        self._update_gauges()
        self._slot_freed.set()  # an idle resident appeared: a waiting admission may evict it
        log.info("loaded %s v%s into slot %s (%.1f ms)", *key, slot, 1e3 * (time.monotonic() - started))

    def _cache(self, key: Key, package: AdapterPackage) -> None:
        self.cpu_cache.put(key, package, package.nbytes)
        self.metrics.cpu_cache_bytes.set(self.cpu_cache.nbytes)

    def resident_bytes(self) -> int:
        """Bytes of adapters in slots, including ones being installed and retired ones still in use."""
        in_use = sum(r.nbytes for r in self.residents.values()) + sum(r.nbytes for r in self._retiring)
        return in_use + self._reserved_bytes

    def _fits(self, nbytes: int) -> bool:
        budget_ok = self.gpu_budget_bytes is None or self.resident_bytes() + nbytes <= self.gpu_budget_bytes
        return bool(self.free_slots) and budget_ok

    async def _admit(self, key: Key, nbytes: int) -> int:
        """Take a free slot with room in the byte budget, evicting idle adapters (LRU) as needed.

        The bytes stay reserved until the caller's install ends (see `_load`).
        """
        if self.gpu_budget_bytes is not None and nbytes > self.gpu_budget_bytes:
            raise AdapterTooLarge(
                f"{key[0]!r} v{key[1]} needs {nbytes / 2**20:.1f} MiB on the device; "
                f"the adapter budget is {self.gpu_budget_bytes / 2**20:.1f} MiB"
            )
        deadline = time.monotonic() + self.admission_timeout_s
        while not self._fits(nbytes):
            idle = [r for r in self.residents.values() if r.refs == 0]
            if idle:
                self._evict(min(idle, key=lambda r: r.last_used))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(
                    f"no room on the device for {key[0]!r}: all {self.engine.num_slots} slots (or the adapter "
                    "budget) are held by in-flight requests",
                    retry_after_s=1,
                )
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), remaining)
            except TimeoutError:
                pass
        self._reserved_bytes += nbytes
        return self.free_slots.pop(0)

    def _evict(self, resident: Resident) -> None:
        if self.residents.get(resident.key) is resident:
            del self.residents[resident.key]
        self._retiring.discard(resident)
        self.engine.evict(resident.slot)
        self.free_slots.append(resident.slot)
        self.metrics.adapter_evictions.labels(resident.key[0]).inc()
        self._update_gauges()
        self._slot_freed.set()
        log.info("evicted %s v%s from slot %s", *resident.key, resident.slot)

    def _retire(self, resident: Resident) -> None:
        """Make `resident` unreachable for new requests now, and free its slot once idle."""
        if resident.refs == 0:
            self._evict(resident)
            return
        if self.residents.get(resident.key) is resident:
            del self.residents[resident.key]
        resident.evict_when_idle = True
        self._retiring.add(resident)

    def _update_gauges(self) -> None:
        self.metrics.slots_used.set(self.engine.num_slots - len(self.free_slots))
        self.metrics.resident_bytes.set(self.resident_bytes())

    # ---- administration ------------------------------------------------------------------------

    def _validate_upload(self, task: str, data: bytes) -> AdapterPackage:
        package = AdapterPackage.from_bytes(data)
        if package.manifest.name != task:
            raise AdapterError(f"the package is for task {package.manifest.name!r}, not {task!r}")
        self.engine.check(package)
        return package

    async def upload(self, task: str, data: bytes) -> TaskEntry:
        """Validate fully, load into a slot, store atomically, then switch unpinned requests to it.

        Nothing is stored unless the package validated and loaded; a failure leaves the task as it was.
        """
        try:
            validate_task_name(task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        async with self._admin_locks[task]:
            package = await self._in_loader(self._validate_upload, task, data)
            version = package.manifest.version
            key = (task, version)
            listing = await asyncio.to_thread(self.store.listing, task)
            if version in listing.versions:
                raise VersionExists(f"version {version} of {task!r} already exists; versions are immutable")
            self._forget(task, [version])  # anything held here under this key predates a purge elsewhere
            await self.ensure_loaded(key, package)
            try:
                stored = await asyncio.to_thread(self.store.write, task, version, data)
            except BaseException:
                if key in self.residents:  # the store is the truth: drop what we loaded
                    self._retire(self.residents[key])
                raise
            info = self._known[key] = VersionInfo(package.manifest, stored.size, stored.signature)
            self._generation[task] = self._generation.get(task, 0) + 1
            entry = self.catalog.get(task)
            left_over = entry is None and listing.state is not None  # the state file of a task purged before: replace it
            if entry is None:
                entry = self.catalog[task] = TaskEntry(task, {})
            switch = not entry.versions or not entry.enabled or version > entry.serving
            entry.versions[version] = info
            state = entry.state_serving(version) if switch else entry.state
            self._cache(key, package)
            if key in self.residents:
                self.residents[key].evict_when_idle = False
            if left_over or state != entry.state:  # a new task that follows its newest version needs no file
                await self._record(task, state, f"stored {task} v{version}, but could not record that it serves")
            entry = await self.entry(task)
        log.info("uploaded %s v%s (%d bytes); serving v%s", task, version, len(data), entry.serving)
        return entry

    async def load(self, task: str, version: int | None = None) -> TaskEntry:
        """Load a stored version (default: the newest) into a slot and serve it to unpinned requests,
        on every replica (the choice is recorded in the store)."""
        async with self._admin_locks[task]:
            entry = await self.entry(task, version)
            version = max(entry.versions) if version is None else version
            if version not in entry.versions:
                raise UnknownVersion(f"task {task!r} has no version {version}; versions: {sorted(entry.versions)}")
            await self.ensure_loaded((task, version))
            entry = await self.entry(task, version)  # it may have changed while loading
            if version not in entry.versions:
                raise UnknownVersion(f"task {task!r} version {version} left the store while it was loading")
            await self._record(task, entry.state_serving(version), f"could not record that {task} serves v{version}")
            if (task, version) in self.residents:
                self.residents[(task, version)].evict_when_idle = False
            return await self.entry(task)

    async def unload(self, task: str, purge: bool = False) -> None:
        """Stop serving `task` on every replica: free its slots (at once, or when in-flight requests
        finish) and its cache; the task stays unloaded, also across restarts, until it is loaded again.

        With `purge`, delete every stored version too; requests already running finish on the old weights.
        """
        async with self._admin_locks[task]:
            try:
                entry = await self.entry(task)
            except UnknownTask:
                listing = await asyncio.to_thread(self.store.listing, task) if purge else None
                if listing is None or not (listing.versions or listing.state):
                    raise
                entry = None  # only unusable files are stored: a purge still clears them
            if purge:  # first, so a store that refuses leaves the task served
                try:
                    await asyncio.to_thread(self.store.delete, task)
                except ServeError:
                    await self._reread(task)  # some versions may be gone before it refused
                    raise
                self._broken = {key: signature for key, signature in self._broken.items() if key[0] != task}
                self._states.pop(task, None)
            elif entry is not None:
                await self._record(task, replace(entry.state, enabled=False), f"could not record that {task} is unloaded")
            if entry is None:
                return
            self._stop_serving(task, retire=purge)
            if purge:
                self._purges[task] = self._purges.get(task, 0) + 1
                self._generation[task] = self._generation.get(task, 0) + 1
                self.catalog.pop(task, None)
                for version in entry.versions:
                    self._known.pop((task, version), None)

    async def _record(self, task: str, state: ServingState, failure: str) -> None:
        """Write `task`'s serving state to the store, then take it here; a store that refuses raises,
        leaving the state as it was everywhere."""
        try:
            stored = await asyncio.to_thread(self.store.write_state, task, state)
        except ServeError as exc:
            raise type(exc)(f"{failure}: {exc.message}", exc.retry_after_s) from exc
        self._generation[task] = self._generation.get(task, 0) + 1  # store reads from before are stale
        self._states[task] = (stored.signature, state)
        if task in self.catalog:
            self.catalog[task].state = state

    def _stop_serving(self, task: str, retire: bool) -> None:
        """Free `task`'s slots (idle ones now, busy ones when their requests finish) and its cached
        packages. `retire` also hides its slots from new requests at once (a purge: the weights are gone)."""
        for resident in [r for r in self.residents.values() if r.key[0] == task]:
            if retire:
                self._retire(resident)
            elif resident.refs == 0:
                self._evict(resident)
            else:
                resident.evict_when_idle = True
        for key in [key for key in self._known if key[0] == task]:
            self.cpu_cache.pop(key)
        self.metrics.cpu_cache_bytes.set(self.cpu_cache.nbytes)
