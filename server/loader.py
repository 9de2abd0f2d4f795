"""Reading adapter packages: from the CPU cache, else from the store (validated against the engine), in the loader thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from monaserve.adapters import AdapterError, AdapterPackage

from .cache import LRUBytesCache
from .engine import Engine
from .errors import UnknownVersion
from .metrics import Metrics
from .store import AdapterStore

T = TypeVar("T")
Key = tuple[str, int]


class PackageLoader:
    """Packages by (task, version), kept in an LRU cache bounded by bytes; reads and validation run in `executor`."""

    def __init__(self, store: AdapterStore, engine: Engine, executor: Executor, metrics: Metrics, cache_bytes: int) -> None:
        self.store = store
        self.engine = engine
        self.executor = executor
        self.metrics = metrics
        self.cache: LRUBytesCache[AdapterPackage] = LRUBytesCache(cache_bytes)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the loader thread (reads, validation and installs take it in turn)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def package(self, key: Key) -> AdapterPackage:
        """The package of `key`, cached; `UnknownVersion` if its file left the store, `AdapterError` if it is unusable."""
        package = self.cache.get(key)
        if package is None:
            package = await self.run(self._read, key)
            self.keep(key, package)
        return package

    def _read(self, key: Key) -> AdapterPackage:
        try:
            data = self.store.read(*key)
        except FileNotFoundError:
            raise UnknownVersion(f"task {key[0]!r} version {key[1]} is no longer in the store") from None
        package = AdapterPackage.from_bytes(data)
        if (package.manifest.name, package.manifest.version) != key:
            raise AdapterError(f"the file holds {package.manifest.name!r} v{package.manifest.version}")
        self.engine.check(package)
        return package

    def validate_upload(self, task: str, data: bytes) -> AdapterPackage:
        """An uploaded package, fully validated for `task` on this engine (run it with `run`)."""
        package = AdapterPackage.from_bytes(data)
        if package.manifest.name != task:
            raise AdapterError(f"the package is for task {package.manifest.name!r}, not {task!r}")
        self.engine.check(package)
        return package

    def keep(self, key: Key, package: AdapterPackage) -> None:
        self.cache.put(key, package, package.nbytes)
        self.metrics.cpu_cache_bytes.set(self.cache.nbytes)

    def drop(self, keys: list[Key]) -> None:
        for key in keys:
            self.cache.pop(key)
        self.metrics.cpu_cache_bytes.set(self.cache.nbytes)
