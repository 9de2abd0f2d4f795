"""Where the data plane sends prepared images: the engine behind a small interface, in this process or another.

`EngineClient` is what the data plane needs of an engine; `LocalEngine` is the one in this process
(a slot lease from the registry, a job for the scheduler). An engine in another process implements the
same call over its transport.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from monaserve.adapters import Manifest

from .registry import Registry
from .scheduler import Job, Scheduler


@dataclass(frozen=True)
class EngineRun:
    """One request's head predictions (model-input pixels), from the version that actually ran."""

    version: int
    manifest: Manifest
    predictions: list[Any]
    queue_s: float
    inference_s: float


class EngineClient(Protocol):
    async def run(self, task: str, version: int, manifest: Manifest, images: list[torch.Tensor], pinned: bool) -> EngineRun:
        """Run `images` (prepared for `manifest`'s input) through `task` at `version`. Unless `pinned`, a
        version that left the store meanwhile may give way to the one the task serves now."""
        ...


class LocalEngine:
    """The engine of this process: a slot lease held for the job's life, and the scheduler's batches."""

    def __init__(self, registry: Registry, scheduler: Scheduler) -> None:
        self.registry = registry
        self.scheduler = scheduler

    async def run(self, task: str, version: int, manifest: Manifest, images: list[torch.Tensor], pinned: bool) -> EngineRun:
        lease = await self.registry.acquire(task, version, manifest, pinned)
        job = Job(
            images,
            lease.slot,
            (task, lease.version),
            on_settled=functools.partial(self.registry.release, lease),
            future=asyncio.get_running_loop().create_future(),
        )
        try:
            self.scheduler.submit(job)
        except BaseException:
            self.registry.release(lease)
            raise
        predictions = await job.future
        return EngineRun(lease.version, lease.manifest, predictions, job.queue_s, job.inference_s)
