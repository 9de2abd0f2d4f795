"""The adapter store: a directory of `<task>/<version>.safetensors`, one immutable file per version."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from monaserve.adapters import AdapterError, Manifest, read_manifest, validate_task_name
from monaserve.adapters.package import atomic_write

from .errors import VersionExists

log = logging.getLogger(__name__)
VERSION_FILE = re.compile(r"^([1-9][0-9]{0,9})\.safetensors$")


class AdapterStore:
    """Packages on a local (or mounted, shared) directory; writes are atomic and never clobber a version."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, task: str, version: int) -> Path:
        return self.root / validate_task_name(task) / f"{int(version)}.safetensors"

    def tasks(self) -> list[str]:
        """Task folders with a valid name, sorted."""
        names = []
        for entry in self.root.iterdir():
            try:
                if entry.is_dir():
                    names.append(validate_task_name(entry.name))
            except ValueError:
                log.warning("store: ignoring folder with an invalid task name: %r", entry.name)
        return sorted(names)

    def versions(self, task: str) -> list[int]:
        """Versions of `task` present in the store, ascending."""
        folder = self.root / validate_task_name(task)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := VERSION_FILE.match(p.name)))

    def size(self, task: str, version: int) -> int:
        return self.path(task, version).stat().st_size

    def manifest(self, task: str, version: int) -> Manifest:
        """The manifest from the file's header; raises `AdapterError` if the file is not a valid package
        or its manifest disagrees with where it is stored."""
        manifest = read_manifest(self.path(task, version))
        if (manifest.name, manifest.version) != (task, version):
            raise AdapterError(
                f"{task}/{version}.safetensors holds {manifest.name!r} v{manifest.version}; name and version must match its path"
            )
        return manifest

    def read(self, task: str, version: int) -> bytes:
        return self.path(task, version).read_bytes()

    def write(self, task: str, version: int, data: bytes) -> Path:
        """Store a new version atomically; an existing version is never overwritten."""
        try:
            return atomic_write(self.path(task, version), data, overwrite=False)
        except FileExistsError:
            raise VersionExists(f"version {version} of {task!r} already exists; versions are immutable") from None

    def delete(self, task: str) -> None:
        """Remove every version of `task`."""
        shutil.rmtree(self.root / validate_task_name(task), ignore_errors=True)
