"""A front-end process's runtime under `--workers`: HTTP, decoding and post-processing here, the engine
in the engine process (`RemoteEngine`), and a mirror of its catalog.

Only the engine process reads the store. The mirror is filled from the engine's catalog at start, takes
every change the engine sends (an admin call's before the call answers, a store read's as it happens),
and asks the engine for a task it lacks; so a front end never serves a task, a version or a state the
engine does not. Admin calls themselves go to the engine process (`forward.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .budgets import SharedTally
from .catalog import TaskEntry, TaskLookup
from .config import ServeConfig
from .decoding import large_image_lane
from .lifecycle import Lifecycle, Progress
from .registry import Registry
from .remote_engine import RemoteEngine
from .run_dir import TALLY_ROWS, RunDir
from .runtime import image_decoder
from .shm_arena import Arena

log = logging.getLogger(__name__)
MiB = 2**20
CONNECT_POLL_S = 0.1
"""How often a front end looks for the engine's socket while the engine process starts."""
LookUp = Callable[[str, int | None], Awaitable[TaskEntry | None]]


class CatalogMirror(TaskLookup):
    """The engine process's catalog as this front end knows it: what it was sent, and what it asked for.

    An answer to a lookup that a change of the same task overtook is older than that change, and is
    dropped (each task counts the changes it was sent, as the catalog counts its generations)."""

    def __init__(self, look_up: LookUp) -> None:
        super().__init__()
        self.look_up = look_up
        self._changes: dict[str, int] = {}

    def take(self, task: str, entry: TaskEntry | None) -> None:
        """The engine's entry for `task` as it changed (None: it left the catalog)."""
        self._changes[task] = self._changes.get(task, 0) + 1
        self._set(task, entry)

    async def fetch(self, task: str, version: int | None = None) -> TaskEntry | None:
        """Ask the engine for `task` and keep its answer, unless a change overtook it."""
        changes = self._changes.get(task, 0)
        entry = await self.look_up(task, version)
        if self._changes.get(task, 0) != changes:
            return self._entries.get(task)
        self._set(task, entry)
        return entry

    async def _miss(self, task: str, version: int | None) -> TaskEntry | None:
        return await self.fetch(task, version)

    def _set(self, task: str, entry: TaskEntry | None) -> None:
        if entry is None:
            self._entries.pop(task, None)
        else:
            self._entries[task] = entry


class FrontEndRuntime(Lifecycle):
    """Decoder and catalog here, the engine behind `RemoteEngine`; ready once the engine process answers."""

    registry: Registry | None = None  # slots and uploads live in the engine process

    def __init__(self, config: ServeConfig, run: RunDir, index: int, on_fatal: Callable[[], None] = lambda: None) -> None:
        super().__init__(config, on_fatal)
        self.run, self.index = run, index
        self.engine_socket = run.engine_socket
        self.admin_socket = run.admin_socket
        self._tallies = 0
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.large_image_lane = large_image_lane()
        self.decoder = image_decoder(config, torch.device("cpu"), self.decode_pool, self.large_image_lane)
        self.arena: Arena | None = None
        self.engine_client: RemoteEngine | None = None
        self._mirror: CatalogMirror | None = None
        self._stopping = False

    @property
    def catalog(self) -> CatalogMirror | None:
        return self._mirror

    @property
    def progress(self) -> Progress:
        """While loading, the engine process's own start-up progress (the demo's training, say)."""
        return self.run.read_progress() or Progress("waiting for the engine process")

    def new_tally(self) -> SharedTally:
        """Where a new body budget counts: a row shared by every front end, of which this process owns a slot."""
        row, self._tallies = self._tallies, self._tallies + 1
        if row >= TALLY_ROWS:
            raise RuntimeError(f"the front ends share {TALLY_ROWS} body budgets, no more")
        slots = self.config.front_ends
        return SharedTally(self.run.tallies, offset=8 * slots * row, slots=slots, own=self.index)

    async def start(self) -> None:
        """Make the arena, wait for the engine process's socket, fill the mirror from it; turn ready."""
        try:
            self.arena = Arena(int(self.config.arena_mb * MiB))
            mirror = self._mirror = CatalogMirror(self._look_up)
            remote = RemoteEngine(self.engine_socket, self.arena, mirror.take)
            while True:
                try:
                    await remote.connect()
                    break
                except (FileNotFoundError, ConnectionRefusedError):  # the engine is still loading
                    await asyncio.sleep(CONNECT_POLL_S)
            remote.when_lost(self._engine_lost)
            self.engine_client = remote
            for task in await remote.task_names():  # after connecting: a change made later is sent here too
                await mirror.fetch(task)
        except Exception as exc:
            log.exception("front-end start-up failed")
            self.fail(f"{type(exc).__name__}: {exc}")
            return
        self.turn_ready()

    async def _look_up(self, task: str, version: int | None) -> TaskEntry | None:
        return await self.engine_client.lookup(task, version)

    def _engine_lost(self) -> None:
        if not self._stopping:
            log.error("the engine process closed its socket; this front end stops")
            self.fail("the engine process is gone")

    async def stop(self) -> None:
        """Stop taking work (requests in flight have finished: uvicorn waits for them first), then let go."""
        self._stopping = True
        self.begin_drain()
        if self.engine_client is not None:
            await self.engine_client.close()
        if self.arena is not None:
            self.arena.close()
        for pool in (self.decode_pool, self.large_image_lane):
            pool.shutdown(wait=True, cancel_futures=True)
