"""The adapter store: `<task>/<version>.safetensors`, one immutable file per version, on any fsspec filesystem.

A local or mounted directory (the default), or an object store such as `s3://bucket/prefix` (the `s3`
extra; credentials and endpoint from the usual AWS environment variables). Replicas that share a store
see each other's uploads and purges when they re-read it.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from monaserve.adapters import AdapterError, Manifest, validate_task_name
from monaserve.adapters.package import atomic_write, read_manifest_from

from .errors import ServeError, StoreFull, StoreUnavailable, VersionExists

log = logging.getLogger(__name__)
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
VERSION_FILE = re.compile(r"^([1-9][0-9]{0,9})\.safetensors$")


@dataclass(frozen=True)
class StoredFile:
    """One stored version: its size, and a signature that changes if the file is replaced."""

    size: int
    signature: str


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

    def versions(self, task: str) -> dict[int, StoredFile]:
        """Versions of `task` present in the store, ascending, with their size and signature."""
        found = {}
        for entry in self._list(f"{self.root}/{validate_task_name(task)}"):
            match = VERSION_FILE.match(entry["name"].rsplit("/", 1)[-1])
            if match and entry["type"] == "file":
                found[int(match.group(1))] = StoredFile(int(entry["size"]), _signature(entry))
        return dict(sorted(found.items()))

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
        exists = VersionExists(f"version {version} of {task!r} already exists; versions are immutable")
        with _store_errors(f"store {task} v{version}"):
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
                    Path(self.path(task, version)).unlink()
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


def _signature(entry: dict) -> str:
    """What changes when a stored object is replaced: its ETag or generation, or else its modification
    time, and its size (key names differ between fsspec backends: s3fs, gcsfs, adlfs, local)."""
    keys = ("ETag", "etag", "generation", "md5", "mtime", "LastModified", "last_modified", "updated", "created")
    stamp = next((str(entry[k]) for k in keys if entry.get(k)), "")
    return f"{entry['size']}:{stamp}"
