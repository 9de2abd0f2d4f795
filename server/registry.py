"""The registry: the facade over the catalog, the package loader and the slot pool, for uploads, loads,
unloads and requests' slot leases.

All state lives on the event loop's thread and changes only there, so no locks guard it; file reads,
validation and installs run in the loader thread. Admin calls on one task run one at a time, in the
order they came. What each task serves (a pinned version; unloaded or not) is kept in the store beside
its versions (`store.ServingState`), so every replica and every restart agrees.

Weights loaded for a version whose stored file then left or changed must never serve: each version has
an *epoch*, moved on whenever that happens, and a load that finishes in a later epoch retires at once.

Under `--workers` the front-end processes mirror this catalog; `announce`, when set, sends them a task's
change: awaited after every admin call that may have changed it (so they have it before the call
answers), in the background for a change a store read brought.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import Executor
from dataclasses import replace
from typing import Literal, NamedTuple

from monaserve.adapters import AdapterError, AdapterPackage, Manifest, validate_task_name, with_version

from .catalog import Catalog, Change, TaskEntry, VersionInfo
from .engine import Engine
from .errors import BadRequest, ServeError, UnknownTask, UnknownVersion, VersionExists
from .loader import PackageLoader
from .metrics import Metrics
from .slots import Lease, SlotPool
from .store import AdapterStore, StoredFile

log = logging.getLogger(__name__)
Key = tuple[str, int]
Location = Literal["slot", "cache", "store"]
UPLOAD_ATTEMPTS = 3
"""Versions an upload without one tries, when other replicas store the next ones between its listing and its write."""
Announce = Callable[[str], Awaitable[None]]
"""Send the server's other processes a task's new entry, and wait until they have taken it."""


class Uploaded(NamedTuple):
    """An upload's outcome: its task's entry after it, and the version it was stored as."""

    entry: TaskEntry
    version: int


def announced(method):
    """An admin call on `task` that is announced once done, unless it failed on a client's error (which changes nothing)."""

    @functools.wraps(method)
    async def call(self: Registry, task: str, *args, **kwargs):
        changed = True
        try:
            return await method(self, task, *args, **kwargs)
        except ServeError as exc:
            changed = exc.status >= 500
            raise
        except AdapterError:  # a package that failed validation: nothing was stored
            changed = False
            raise
        finally:
            if changed and self.announce is not None:
                await self.announce(task)

    return call


class Registry:
    """Tasks as the store holds them (`catalog`), packages in RAM (`loader`), and device slots (`slots`)."""

    def __init__(
        self,
        store: AdapterStore,
        engine: Engine,
        executor: Executor,
        metrics: Metrics,
        cpu_cache_bytes: int,
        gpu_budget_bytes: int | None,
        admission_timeout_s: float,
    ) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.catalog = Catalog(store, metrics, listener=self)
        self.loader = PackageLoader(store, engine, executor, metrics, cpu_cache_bytes)
        self.slots = SlotPool(engine, executor, metrics, gpu_budget_bytes, admission_timeout_s)
        self._admin_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loading: dict[Key, asyncio.Task] = {}
        self._epochs: dict[Key, int] = {}
        self.announce: Announce | None = None
        self._announcing: set[asyncio.Future] = set()

    # ---- what is where ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the store; under `--workers`, return once the other processes have what it changed."""
        await self.catalog.refresh()
        await asyncio.gather(*self._announcing, return_exceptions=True)

    def location(self, key: Key) -> Location:
        """Where a version is loaded: in a slot on the engine's device, in the host memory cache, or only in the store."""
        if key in self.slots.residents:
            return "slot"
        return "cache" if key in self.loader.cache else "store"

    def slot_of(self, key: Key) -> int | None:
        resident = self.slots.residents.get(key)
        return None if resident is None else resident.slot

    def catalog_changed(self, change: Change) -> None:
        """Follow a store read: drop weights whose file left or changed, free an unloaded task's slots,
        and have a task in use here ready in the version it serves now."""
        task, before, after = change.task, change.before, change.after
        if change.material:
            self._announce_soon(task)
        in_use = before is not None and before[1] and (task, before[0]) in self.slots.residents
        self._forget(task, change.dropped)
        if after is None or before is None:
            return
        if before[1] and not after.enabled:  # unloaded through another replica
            self._stop_serving(task, retire=False)
        elif in_use and after.enabled and (after.serving != before[0] or (task, after.serving) not in self.slots.residents):
            self._preload((task, after.serving))

    def _announce_soon(self, task: str) -> None:
        """Announce a change that no admin call waits on (a store read's, a quarantine): in the background."""
        if self.announce is not None:
            announcing = asyncio.ensure_future(self.announce(task))
            self._announcing.add(announcing)
            announcing.add_done_callback(self._announcing.discard)

    def _forget(self, task: str, versions: list[int], why: str = "left or changed in the store") -> None:
        """Drop what this replica holds of versions whose stored file is gone or was replaced: slots
        (also ones still loading: their epoch moves on) and cached packages."""
        keys = [(task, version) for version in versions]
        dropped = [str(key[1]) for key in keys if key in self.slots.residents or key in self.loader.cache]
        for key in keys:
            self._epochs[key] = self._epochs.get(key, 0) + 1
            if key in self.slots.residents:
                self.slots.retire(self.slots.residents[key])
        self.loader.drop(keys)
        if dropped:
            log.info("store: %s v%s %s; dropped here", task, ",".join(dropped), why)

    def _stop_serving(self, task: str, retire: bool) -> None:
        """Free `task`'s slots and cached packages (`retire`: its weights are gone, hide its slots at once)."""
        self.slots.release_task(task, retire)
        self.loader.drop(self.catalog.versions_of(task))

    # ---- requests ---------------------------------------------------------------------------

    async def acquire(self, task: str, version: int, manifest: Manifest, pinned: bool = True) -> Lease:
        """Hold a slot with (task, version) in it, loading it first if needed.

        Unless `pinned`, a version that left the store or proved unusable meanwhile gives way to the
        version the task serves now, if that takes the same input (the images are already prepared).
        """
        tried = set()
        while True:
            try:
                await self.ensure_loaded((task, version))
            except UnknownVersion:
                tried.add(version)
                if pinned:
                    raise
                await self.catalog.reread(task)  # the store's truth, also about a file deleted meanwhile
                now = await self.catalog.serving(task)
                if now.version in tried or now.manifest.input != manifest.input or now.manifest.kind != manifest.kind:
                    raise
                version, manifest = now.version, now.manifest
                continue
            lease = self.slots.lease((task, version), manifest)
            if lease is not None:  # else it was evicted between the load and now: load again
                return lease

    def release(self, lease: Lease) -> None:
        self.slots.release(lease)

    async def ensure_loaded(self, key: Key, package: AdapterPackage | None = None) -> None:
        """Install `key` in a slot unless it is there; concurrent callers share one load. Without
        `package` it comes from the CPU cache or the store."""
        if key in self.slots.residents:
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

    def _preload(self, key: Key) -> None:
        """Load `key` in the background; a failure is logged (and retried by the next request)."""
        load = asyncio.ensure_future(self.ensure_loaded(key))
        load.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _load(self, key: Key, package: AdapterPackage | None) -> None:
        started = time.monotonic()
        epoch = self._epochs.get(key, 0)
        if package is None:
            try:
                package = await self.loader.package(key)
            except AdapterError as exc:
                self.catalog.quarantine(key, exc)
                self._announce_soon(key[0])
                raise UnknownVersion(f"task {key[0]!r} version {key[1]} is unusable in the store: {exc}") from None
            if self._epochs.get(key, 0) != epoch:  # its file left or changed while it was read: drop what was read
                self.loader.drop([key])
                raise UnknownVersion(f"task {key[0]!r} version {key[1]} left or changed in the store while it was read")
        resident = await self.slots.install(key, package)
        if self._epochs.get(key, 0) != epoch:
            self.slots.retire(resident)  # purged or replaced while loading: these weights are gone
        self.metrics.adapter_loads.labels(key[0]).inc()
        self.metrics.adapter_load_seconds.observe(time.monotonic() - started)
        log.info("loaded %s v%s into slot %s (%.1f ms)", *key, resident.slot, 1e3 * (time.monotonic() - started))

    # ---- administration ---------------------------------------------------------------------

    @announced
    async def upload(self, task: str, data: bytes, version: int | None = None) -> Uploaded:
        """Validate fully, load into a slot, store atomically as `version` (default: the task's next), then
        switch unpinned requests to it. The version in the package's manifest is set to the one stored.
        Nothing is stored unless the package validated and loaded; a failure leaves the task as it was."""
        try:
            validate_task_name(task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        async with self._admin_locks[task]:
            package = await self.loader.run(self.loader.validate_upload, task, data)
            for attempt in range(1, UPLOAD_ATTEMPTS + 1):
                listing = await asyncio.to_thread(self.store.listing, task)
                number = self._new_version(task, listing.versions, version)
                try:
                    package, stored = await self._load_and_store(task, number, data, package)
                    break
                except VersionExists:  # another replica stored it since the listing: the next one, unless this one was asked for
                    if version is not None or attempt == UPLOAD_ATTEMPTS:
                        raise
            version, key = number, (task, number)
            left_over = task not in self.catalog and listing.state is not None  # a purged task's state file: replace it
            entry = self.catalog.get(task)
            switch = entry is None or not entry.enabled or version > entry.serving
            entry = self.catalog.add(task, version, VersionInfo(package.manifest, stored.size, stored.signature))
            state = entry.state_serving(version) if switch else entry.state
            self.loader.keep(key, package)
            self.slots.keep(key)
            if left_over or state != entry.state:  # a new task that follows its newest version needs no file
                await self.catalog.record(task, state, f"stored {task} v{version}, but could not record that it serves")
            entry = await self.catalog.entry(task)
        log.info("uploaded %s v%s (%d bytes); serving v%s", task, version, len(data), entry.serving)
        return Uploaded(entry, version)

    @staticmethod
    def _new_version(task: str, stored: Collection[int], asked: int | None) -> int:
        """The version an upload is stored as: `asked`, else one more than the newest of `stored`; 409 if `asked` is taken."""
        following = max(stored, default=0) + 1
        if asked in stored:
            raise VersionExists(
                f"version {asked} of {task!r} exists (stored: {sorted(stored)}) and versions are immutable: "
                f"leave the version out to store this upload as v{following}, or ask for an unused one"
            )
        return asked or following

    async def _load_and_store(self, task: str, version: int, data: bytes, package: AdapterPackage) -> tuple[AdapterPackage, StoredFile]:
        """`package` numbered `version` (its header rewritten in the loader thread), loaded into a slot, then
        stored; the slot is let go if the store refuses it, so the store stays the truth."""
        if version != package.manifest.version:
            data = await self.loader.run(with_version, data, version)
            package = replace(package, manifest=package.manifest.model_copy(update={"version": version}))
        key = (task, version)
        self._forget(task, [version])  # anything held here under this key predates a purge elsewhere
        await self.ensure_loaded(key, package)
        try:
            stored = await asyncio.to_thread(self.store.write, task, version, data)
        except BaseException:
            if key in self.slots.residents:
                self.slots.retire(self.slots.residents[key])
            raise
        return package, stored

    @announced
    async def load(self, task: str, version: int | None = None) -> TaskEntry:
        """Load a stored version (default: the newest) into a slot and serve it to unpinned requests, on
        every replica (the choice is recorded in the store)."""
        async with self._admin_locks[task]:
            entry = await self.catalog.entry(task, version)
            version = max(entry.versions) if version is None else version
            if version not in entry.versions:
                raise UnknownVersion(f"task {task!r} has no version {version}; versions: {sorted(entry.versions)}")
            await self.ensure_loaded((task, version))
            entry = await self.catalog.entry(task, version)  # it may have changed while loading
            if version not in entry.versions:
                raise UnknownVersion(f"task {task!r} version {version} left the store while it was loading")
            await self.catalog.record(task, entry.state_serving(version), f"could not record that {task} serves v{version}")
            self.slots.keep((task, version))
            return await self.catalog.entry(task)

    @announced
    async def unload(self, task: str, purge: bool = False) -> None:
        """Stop serving `task` on every replica: free its slots (at once, or when in-flight requests
        finish) and its cache; it stays unloaded, also across restarts, until it is loaded again.
        With `purge`, delete every stored version too; requests already running finish on the old weights."""
        async with self._admin_locks[task]:
            try:
                entry = await self.catalog.entry(task)
            except UnknownTask:
                listing = await asyncio.to_thread(self.store.listing, task) if purge else None
                if listing is None or not (listing.versions or listing.state):
                    raise
                entry = None  # only unusable files are stored: a purge still clears them
            known = [version for _, version in self.catalog.versions_of(task)]
            if purge:  # first, so a store that refuses leaves the task served
                await self.catalog.purge(task)
                loading = {version for name, version in self._loading if name == task}  # also ones read in meanwhile
                self._forget(task, sorted(set(known) | loading), "purged")
                self._stop_serving(task, retire=True)
            elif entry is not None:
                await self.catalog.record(task, replace(entry.state, enabled=False), f"could not record that {task} is unloaded")
                self._stop_serving(task, retire=False)
