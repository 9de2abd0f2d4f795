"""The catalog: this replica's mirror of the store's tasks, versions and serving states.

It reads the store in threads and merges on the event loop. A store read that started before an admin
call changed the task (an upload, a purge, a new serving state: each moves the task's *generation* on)
is stale and is dropped. Files found unusable are remembered by signature, logged and counted once, and
skipped until they are replaced. Whoever holds loaded weights hears of every change a store read
brings (`CatalogListener`); changes this replica makes itself (`add`, `record`, `purge`, `quarantine`)
are made by that holder, which knows of them already.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

from monaserve.adapters import AdapterError, Manifest, validate_task_name
from monaserve.adapters.kinds import TaskKind, get_kind

from .errors import BadRequest, ServeError, TaskUnloaded, UnknownTask, UnknownVersion
from .metrics import Metrics
from .store import AdapterStore, ServingState

log = logging.getLogger(__name__)
Key = tuple[str, int]
STATE_KEY = 0
"""The version under which a task's unusable serving state file is remembered."""


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

    @property
    def manifest(self) -> Manifest:
        """The manifest of the version unpinned requests get."""
        return self.versions[self.serving].manifest

    def state_serving(self, version: int) -> ServingState:
        """The enabled state that serves `version`: pinned to it, or following the newest if it is the newest."""
        return ServingState(None if version == max(self.versions) else version, enabled=True)


def entry_to_json(entry: TaskEntry) -> bytes:
    """`entry` as JSON, for a process that mirrors this catalog (`front_end.CatalogMirror`)."""
    versions = {
        str(version): {"manifest": info.manifest.model_dump(mode="json"), "nbytes": info.nbytes, "signature": info.signature}
        for version, info in entry.versions.items()
    }
    return json.dumps({"name": entry.name, "versions": versions, "state": asdict(entry.state)}).encode()


def entry_from_json(data: bytes) -> TaskEntry:
    """The entry `entry_to_json` wrote (manifests validated again: the other process is trusted, not its bytes)."""
    raw = json.loads(data)
    versions = {
        int(version): VersionInfo(Manifest.model_validate(info["manifest"]), int(info["nbytes"]), str(info["signature"]))
        for version, info in raw["versions"].items()
    }
    return TaskEntry(str(raw["name"]), versions, ServingState(**raw["state"]))


@dataclass(frozen=True)
class TaskVersion:
    """A task and one of its stored versions, resolved once for a request."""

    entry: TaskEntry
    version: int

    @property
    def manifest(self) -> Manifest:
        return self.entry.versions[self.version].manifest

    @property
    def kind(self) -> TaskKind:
        return get_kind(self.manifest.kind)


@dataclass(frozen=True)
class Change:
    """What a store read changed for one task: versions that left the store or were replaced in it, and
    what it served before (`(version, enabled)`, None if it was unknown) and after (None if it is gone)."""

    task: str
    dropped: list[int]
    before: tuple[int, bool] | None
    after: TaskEntry | None
    material: bool
    """Whether anything changed: versions came, went or were replaced, or the serving state moved."""


class CatalogListener(Protocol):
    def catalog_changed(self, change: Change) -> None: ...


@dataclass(frozen=True)
class _TaskRead:
    versions: dict[int, VersionInfo]
    broken: dict[Key, tuple[str, AdapterError]]
    state: ServingState
    state_signature: str | None


class TaskLookup(Mapping[str, TaskEntry]):
    """Task name -> `TaskEntry`, with the lookups a request makes; where a task it lacks is looked for is
    the subclass's (`_miss`): the store (`Catalog`), or the engine process (`front_end.CatalogMirror`)."""

    def __init__(self) -> None:
        self._entries: dict[str, TaskEntry] = {}

    def __getitem__(self, task: str) -> TaskEntry:
        return self._entries[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    async def _miss(self, task: str, version: int | None) -> TaskEntry | None:
        """`task` looked for where the truth is, because it is not here (or lacks `version`)."""
        raise NotImplementedError

    async def entry(self, task: str, version: int | None = None) -> TaskEntry:
        """The entry for `task`, looked for on a miss (also for a version it does not know)."""
        try:
            validate_task_name(task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        entry = self._entries.get(task)
        if entry is None or (version is not None and version not in entry.versions):
            entry = await self._miss(task, version)
        if entry is None:
            raise UnknownTask(f"unknown task {task!r}; {self.known_tasks()}")
        return entry

    def known_tasks(self, shown: int = 10) -> str:
        """The tasks there are, for an error that names one that is not (the first `shown`, and where to see all)."""
        names = sorted(self._entries)
        if not names:
            return "no task is stored yet: upload one (PUT /v1/adapters/{task})"
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return f"the tasks are {', '.join(names[:shown])}{more} (GET /v1/tasks)"

    async def version(self, task: str, version: int | None = None) -> TaskVersion:
        """`task` at `version` (default: the version it serves); 404 for an unknown task or version."""
        entry = await self.entry(task, version)
        version = entry.serving if version is None else version
        if version not in entry.versions:
            raise UnknownVersion(f"task {task!r} has no version {version}; versions: {sorted(entry.versions)}")
        return TaskVersion(entry, version)

    async def serving(self, task: str, version: int | None = None) -> TaskVersion:
        """What a request for `task` (pinned to `version`, or not) runs: 404 while the task is unloaded
        (said before whether the version exists), or for an unknown task or version."""
        entry = await self.entry(task, version)
        if not entry.enabled:
            raise TaskUnloaded(
                f"task {task!r} is unloaded; load it to serve it again (POST /v1/adapters/{task}/load or /v2/repository/models/{task}/load)"
            )
        return await self.version(task, version)


class Catalog(TaskLookup):
    """Task name -> `TaskEntry`, as the store last said (or as this replica's admin calls made it)."""

    def __init__(self, store: AdapterStore, metrics: Metrics, listener: CatalogListener) -> None:
        super().__init__()
        self.store = store
        self.metrics = metrics
        self.listener = listener
        self._known: dict[Key, VersionInfo] = {}
        self._broken: dict[Key, str] = {}  # stored files found unusable, by signature
        self._states: dict[str, tuple[str, ServingState]] = {}  # serving state files read, by signature
        self._generation: dict[str, int] = {}

    def versions_of(self, task: str) -> list[Key]:
        """Every version of `task` this replica knows of, usable or not yet read."""
        return [key for key in self._known if key[0] == task]

    # ---- reading the store ------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the whole store."""
        await asyncio.to_thread(self.store.remove_stale_temp_files)
        tasks = await asyncio.to_thread(self.store.tasks)
        for task in set(tasks) | self._entries.keys():
            await self.reread(task)

    async def _miss(self, task: str, version: int | None) -> TaskEntry | None:
        return await self.reread(task)

    async def reread(self, task: str) -> TaskEntry | None:
        """Read `task` from the store and merge it, unless an admin call changed it meanwhile."""
        generation = self._generation.get(task, 0)
        read = await asyncio.to_thread(self._read_task, task)
        for key, (signature, error) in read.broken.items():
            self.mark_broken(key, signature, error)
        if self._generation.get(task, 0) != generation:
            return self._entries.get(task)
        infos = read.versions
        self._known.update(((task, version), info) for version, info in infos.items())
        if read.state_signature is None:
            self._states.pop(task, None)
        else:
            self._states[task] = (read.state_signature, read.state)
        entry = self._entries.get(task)
        before, dropped = None, []
        known = None if entry is None else (set(entry.versions), entry.state)
        if entry is not None:  # versions purged or replaced in the store (by this or another replica)
            before = (entry.serving, entry.enabled)
            gone = [v for v in entry.versions if v not in infos]
            dropped = gone + [v for v, info in entry.versions.items() if v in infos and infos[v].signature != info.signature]
            for version in gone:
                self._known.pop((task, version), None)
        if not infos:
            self._entries.pop(task, None)
            entry = None
        elif entry is None:
            entry = self._entries[task] = TaskEntry(task, infos, read.state)
        else:
            entry.versions, entry.state = infos, read.state
        material = bool(dropped) or known != (None if entry is None else (set(entry.versions), entry.state))
        self.listener.catalog_changed(Change(task, dropped, before, entry, material))
        return entry

    def _read_task(self, task: str) -> _TaskRead:
        """Versions and serving state of `task` in the store, and files newly found unusable (runs in a
        thread and changes nothing). A store that fails raises: an outage never looks like a broken or
        deleted file."""
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
                    broken[(task, STATE_KEY)] = (
                        state_signature,
                        AdapterError(f"its serving state is unusable ({exc}); serving the newest version"),
                    )
        return _TaskRead(infos, broken, state, state_signature)

    def mark_broken(self, key: Key, signature: str, error: Exception) -> None:
        """Remember a stored file as unusable until it is replaced; log and count it once."""
        if self._broken.get(key) == signature:
            return
        self._broken[key] = signature
        self.metrics.store_errors.inc()
        where = f"{key[0]}/serving.json" if key[1] == STATE_KEY else f"{key[0]}/{key[1]}.safetensors"
        log.error("store: skipping %s: %s", where, error)

    # ---- changes made here ------------------------------------------------------------------

    def _changed(self, task: str) -> None:
        """An admin call changed `task`: store reads that started before are stale."""
        self._generation[task] = self._generation.get(task, 0) + 1

    def quarantine(self, key: Key, error: Exception) -> None:
        """A version whose file proved unusable when loaded (a corrupt body, another backbone) leaves the
        catalog; unpinned requests move to the newest version left."""
        task, version = key
        entry = self._entries.get(task)
        info = self._known.pop(key, None) or (entry.versions.get(version) if entry else None)
        if info is not None:
            self.mark_broken(key, info.signature, error)
        self._changed(task)
        if entry is None or version not in entry.versions:
            return
        del entry.versions[version]
        if not entry.versions:
            del self._entries[task]

    def add(self, task: str, version: int, info: VersionInfo) -> TaskEntry:
        """A version this replica just stored."""
        self._known[(task, version)] = info
        self._changed(task)
        entry = self._entries.setdefault(task, TaskEntry(task, {}))
        entry.versions[version] = info
        return entry

    async def record(self, task: str, state: ServingState, failure: str) -> None:
        """Write `task`'s serving state to the store, then take it here; a store that refuses raises,
        leaving the state as it was everywhere."""
        try:
            stored = await asyncio.to_thread(self.store.write_state, task, state)
        except ServeError as exc:
            raise type(exc)(f"{failure}: {exc.message}", exc.retry_after_s) from exc
        self._changed(task)
        self._states[task] = (stored.signature, state)
        if task in self._entries:
            self._entries[task].state = state

    async def purge(self, task: str) -> None:
        """Delete every stored file of `task`, then forget it. A store that refuses part-way is re-read
        (some versions may be gone) and the error raised."""
        try:
            await asyncio.to_thread(self.store.delete, task)
        except ServeError:
            await self.reread(task)
            raise
        self._broken = {key: signature for key, signature in self._broken.items() if key[0] != task}
        self._states.pop(task, None)
        self._changed(task)
        self._entries.pop(task, None)
        for key in self.versions_of(task):
            del self._known[key]
