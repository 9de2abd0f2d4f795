"""The adapter store: `<task>/<version>.safetensors`, one immutable file per version, on any fsspec filesystem.

A local or mounted directory (the default), or an object store such as `s3://bucket/prefix` (the `s3`
extra; credentials and endpoint from the usual AWS environment variables). Replicas that share a store
see each other's uploads and purges when they re-read it.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from monaserve.adapters import AdapterError, Manifest, validate_task_name
from monaserve.adapters.package import atomic_write, read_manifest_from

from .errors import ConcurrentChange, ServeError, StoreFull, StoreUnavailable, VersionExists

log = logging.getLogger(__name__)
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
VERSION_FILE = re.compile(r"^([1-9][0-9]{0,9})\.safetensors$")
STATE_FILE = "serving.json"
TEMP_FILE = re.compile(r"^\.(?:[1-9][0-9]{0,9}\.safetensors|serving\.json)\..+\.tmp$")
"""The temp files `atomic_write` makes next to a version or the serving state before moving them into place."""
STALE_TEMP_AGE_S = 15 * 60
"""A temp file untouched this long belongs to no live writer (a writer's every write updates its mtime):
it was left by a process killed mid-write, and is removed."""


@dataclass(frozen=True)
class StoredFile:
    """One stored file: its size, and a signature that changes if the file is replaced."""

    size: int
    signature: str


@dataclass(frozen=True)
class ServingState:
    """What a task serves, kept in the store (`<task>/serving.json`) so every replica and every restart
    agrees: a pinned version (None: the newest stored one) and whether it serves at all (unloaded)."""

    version: int | None = None
    enabled: bool = True

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ServingState:
        """Parse a stored state; raises ValueError saying what is wrong with it."""
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        version, enabled = value.get("version"), value.get("enabled", True)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise ValueError(f"'version' must be a positive integer or null, got {version!r}")
        if not isinstance(enabled, bool):
            raise ValueError(f"'enabled' must be true or false, got {enabled!r}")
        return cls(version, enabled)


@dataclass(frozen=True)
class TaskListing:
    """A task folder as stored: its versions, and its serving state file if it has one."""

    versions: dict[int, StoredFile]
    state: StoredFile | None


class AdapterStore:
    """Packages under one root; writes are atomic and never clobber an existing version.

    On a local filesystem the no-clobber write is a hard link that fails if the version exists. Object
    stores write whole objects atomically, but the existence check and the write are two calls there, so
    two replicas uploading the same new version at the same instant can both succeed (the later wins).
    """

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, task: str, version: int) -> str:
        return f"{self.root}/{validate_task_name(task)}/{int(version)}.safetensors"

    def tasks(self) -> list[str]:
        """Task folders with a valid name, sorted."""
        names = []
        for entry in self._list(self.root):
            if entry["type"] != "directory":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            try:
                names.append(validate_task_name(name))
            except ValueError:
                log.warning("store: ignoring folder with an invalid task name: %r", name)
        return sorted(names)

    def listing(self, task: str) -> TaskListing:
        """What the store holds of `task`: its versions, ascending, and its serving state file."""
        found, state = {}, None
        for entry in self._list(f"{self.root}/{validate_task_name(task)}"):
            name = entry["name"].rsplit("/", 1)[-1]
            if entry["type"] != "file":
                continue
            if match := VERSION_FILE.match(name):
                found[int(match.group(1))] = StoredFile(int(entry["size"]), _signature(entry))
            elif name == STATE_FILE:
                state = StoredFile(int(entry["size"]), _signature(entry))
        return TaskListing(dict(sorted(found.items())), state)

    def versions(self, task: str) -> dict[int, StoredFile]:
        """Versions of `task` present in the store, ascending, with their size and signature."""
        return self.listing(task).versions

    def read_state(self, task: str) -> ServingState:
        """The task's serving state; raises FileNotFoundError if it has none, ValueError if it is malformed."""
        path = f"{self.root}/{validate_task_name(task)}/{STATE_FILE}"
        with _store_errors(f"read the serving state of {task}"):
            data = self.fs.cat_file(path)
        return ServingState.from_json(data)

    def write_state(self, task: str, state: ServingState) -> StoredFile:
        """Replace the task's serving state, atomically (readers see the old document or the new one)."""
        path = f"{self.root}/{validate_task_name(task)}/{STATE_FILE}"
        with _store_errors(f"record the serving state of {task}"), _purged_meanwhile(task, "its serving state"):
            if self.local:  # into the folder as it is: one a purge removed meanwhile is not made anew
                atomic_write(path, state.to_json(), overwrite=True, make_parents=False)
            else:
                self.fs.pipe_file(path, state.to_json())
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
        return StoredFile(int(info["size"]), _signature(info))

    def remove_stale_temp_files(self, max_age_s: float = STALE_TEMP_AGE_S) -> int:
        """Remove temp files that writers killed mid-write left behind (local stores; object stores write
        whole objects); returns how many. A file younger than `max_age_s` may have a live writer: kept."""
        if not self.local:
            return 0
        removed, cutoff = 0, time.time() - max_age_s
        for path in Path(self.root).glob("*/.*.tmp"):
            try:
                if TEMP_FILE.match(path.name) and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
                    log.warning("store: removed %s, left by a writer that stopped mid-write", path)
            except FileNotFoundError:
                continue  # its writer finished, or another replica removed it first
            except OSError as exc:
                log.warning("store: could not remove stale temp file %s: %s", path, exc)
        return removed

    def manifest(self, task: str, version: int, size: int | None = None) -> Manifest:
        """The manifest from the file's header; raises `AdapterError` if the file is not a valid package
        or its manifest disagrees with where it is stored. `size` (from `versions`) saves a stat call."""
        path = self.path(task, version)
        # no read-ahead on remote files: only the header is wanted, not a block of the tensors
        options = {} if self.local else {"cache_type": "none"}
        with _store_errors(f"read {task} v{version}"):
            size = self.fs.size(path) if size is None else size
            with self.fs.open(path, "rb", **options) as f:
                manifest = read_manifest_from(f, size)
        if (manifest.name, manifest.version) != (task, version):
            raise AdapterError(
                f"{task}/{version}.safetensors holds {manifest.name!r} v{manifest.version}; name and version must match its path"
            )
        return manifest

    def read(self, task: str, version: int) -> bytes:
        path = self.path(task, version)
        with _store_errors(f"read {task} v{version}"):
            return self.fs.cat_file(path)

    def write(self, task: str, version: int, data: bytes) -> StoredFile:
        """Store a new version atomically; an existing version is never overwritten."""
        path = self.path(task, version)
        exists = VersionExists(f"version {version} of {task!r} already exists and versions are immutable: ask for an unused version")
        with _store_errors(f"store {task} v{version}"), _purged_meanwhile(task, f"v{version}"):
            if self.local:
                try:
                    atomic_write(path, data, overwrite=False)
                except FileExistsError:
                    raise exists from None
            elif self.fs.exists(path):
                raise exists
            else:
                self.fs.pipe_file(path, data)
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
        return StoredFile(int(info["size"]), _signature(info))

    def delete(self, task: str) -> None:
        """Remove every version of `task`."""
        folder = f"{self.root}/{validate_task_name(task)}"
        with _store_errors(f"delete {task}"):
            if self.local:  # NFS may keep .nfsXXXX files of open readers: what can go, goes ...
                shutil.rmtree(folder, ignore_errors=True)
                for version in self.versions(task):  # ... but a version left behind is an error, raised here
                    Path(self.path(task, version)).unlink(missing_ok=True)  # (or gone already: another purge)
            elif self.fs.exists(folder):
                self.fs.rm(folder, recursive=True)

    def _list(self, folder: str) -> list[dict]:
        """Entries of `folder` as fsspec `ls` details, fresh (no listing cache); none if it is missing."""
        self.fs.invalidate_cache(folder)
        with _store_errors("list adapters"):
            try:
                return self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []


@contextmanager
def _store_errors(action: str) -> Iterator[None]:
    """Failures of the storage itself as serving errors: no room is `StoreFull` (507), anything else
    (read-only, no permission, unreachable) `StoreUnavailable` (503). A missing file and an invalid
    package stay themselves."""
    try:
        yield
    except (FileNotFoundError, ServeError, AdapterError):
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in NO_ROOM:
            raise StoreFull(f"the adapter store has no room to {action}: {reason}") from exc
        raise StoreUnavailable(f"the adapter store failed to {action}: {reason}", retry_after_s=5) from exc
    except Exception as exc:  # object-store clients raise their own types for network failures
        log.exception("store: %s failed", action)
        raise StoreUnavailable(f"the adapter store failed to {action}: {type(exc).__name__}: {exc}", retry_after_s=5) from exc


@contextmanager
def _purged_meanwhile(task: str, what: str) -> Iterator[None]:
    """A write whose folder vanished under it (a purge of the task, by this or another replica) is a
    409 that says so: nothing was stored."""
    try:
        yield
    except FileNotFoundError:
        raise ConcurrentChange(
            f"{task!r} was purged while {what} was being stored, so nothing was stored; upload again to store it anew"
        ) from None


def _signature(entry: dict) -> str:
    """What changes when a stored object is replaced: its ETag or generation, or else its modification
    time and inode (a file moved into place is a new inode, even within one mtime tick), and its size
    (key names differ between fsspec backends: s3fs, gcsfs, adlfs, local)."""
    keys = ("ETag", "etag", "generation", "md5", "mtime", "LastModified", "last_modified", "updated", "created")
    stamp = next((str(entry[k]) for k in keys if entry.get(k)), "")
    return f"{entry['size']}:{stamp}" + (f":{entry['ino']}" if entry.get("ino") else "")
