"""The engine in another process, both ends: `EngineService` in the engine process answers front ends'
messages over a Unix socket; `RemoteEngine` in a front end is the `EngineClient` that sends them.

A front end writes a request's prepared images into its own shared-memory arena and sends their
regions; the engine process reads them in place (its batch is stacked straight from them), runs the
job on its `LocalEngine` and answers with the head outputs. A region is freed only when its answer
arrives (a result, an error, or the acknowledgement of a cancel), so the engine never reads memory the
front end has reused. Errors cross as their code and are raised again as the same `ServeError`.

The engine's catalog is the only one that reads the store. A front end mirrors it: it asks for the
tasks it lacks (`lookup`, `tasks`), and the engine sends it every change its catalog takes, with the
task's new entry (`EngineService.changed`). An admin call waits until each front end has acknowledged
its change (for at most `ACK_TIMEOUT_S`), so a call that has returned has been seen everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import torch

from monaserve.adapters import Manifest

from .catalog import Catalog, TaskEntry, entry_from_json, entry_to_json
from .engine_client import EngineClient, EngineRun
from .errors import EngineUnavailable, Overloaded, ServeError, UnknownTask
from .ipc import ProtocolError, pack_outputs, read_message, unpack_outputs, write_message
from .shm_arena import Arena, ArenaView, Region

log = logging.getLogger(__name__)
TaskChanged = Callable[[str, TaskEntry | None], None]
"""What a front end does when the engine says a task changed: take its new entry (None: it is gone)."""
ACK_TIMEOUT_S = 5.0
"""How long `EngineService.changed` waits for a front end's acknowledgement before going on without it."""


@functools.cache
def _error_classes() -> dict[str, type[ServeError]]:
    found, todo = {}, [ServeError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_header(exc: ServeError) -> dict:
    return {"ok": False, "code": exc.code, "message": exc.message, "retry_after_s": exc.retry_after_s}


def raise_error(header: dict) -> None:
    """Raise again the `ServeError` an answer describes (a code this side does not know is a 500)."""
    cls = _error_classes().get(header.get("code"), ServeError)
    raise cls(str(header.get("message")), header.get("retry_after_s"))


def engine_gone(why: str) -> EngineUnavailable:
    return EngineUnavailable(f"the engine process is not answering ({why}); retry shortly", 1)


class EngineService:
    """The engine process's socket: one connection per front end, its messages answered concurrently."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.engine: EngineClient | None = None
        self.catalog: Catalog | None = None
        self.server: asyncio.AbstractServer | None = None
        self._front_ends: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self._acks: dict[int, tuple[asyncio.StreamWriter, asyncio.Future]] = {}
        self._notices = itertools.count()

    async def start(self, engine: EngineClient, catalog: Catalog) -> None:
        """Answer front ends' runs on `engine` and lookups in `catalog` from now on (the socket appears
        when the engine is ready)."""
        self.engine, self.catalog = engine, catalog
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)  # this server's own processes only

    async def stop(self) -> None:
        """Close the socket and every front end's connection (a front end left connected would keep it open)."""
        if self.server is None:
            return
        self.server.close()
        for serving in list(self._front_ends.values()):
            serving.cancel()
        await asyncio.gather(*self._front_ends.values(), return_exceptions=True)
        await self.server.wait_closed()

    async def changed(self, task: str) -> None:
        """Send every front end `task`'s entry as it is now, and wait (up to `ACK_TIMEOUT_S`) until each has taken it."""
        entry = self.catalog.get(task)
        notice, payload = {"op": "changed", "task": task, "gone": entry is None}, b"" if entry is None else entry_to_json(entry)
        waiting = []
        for writer in list(self._front_ends):
            key = next(self._notices)
            acked = asyncio.get_running_loop().create_future()
            self._acks[key] = (writer, acked)
            waiting.append((key, acked))
            with contextlib.suppress(ConnectionError, RuntimeError):
                write_message(writer, notice | {"id": key}, payload)
        if not waiting:
            return
        try:
            _, late = await asyncio.wait([acked for _, acked in waiting], timeout=ACK_TIMEOUT_S)
            if late:
                log.warning("%d front end(s) did not confirm that %r changed within %g s", len(late), task, ACK_TIMEOUT_S)
        finally:
            for key, _ in waiting:
                self._acks.pop(key, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arenas: dict[str, ArenaView] = {}
        running: dict[int, asyncio.Task] = {}
        self._front_ends[writer] = asyncio.current_task()
        try:
            while True:
                header, _ = await read_message(reader)
                op, key = header.get("op"), header.get("id")
                if not isinstance(key, int):
                    raise ProtocolError(f"a message without an integer id: {op!r}")
                if op in ("run", "lookup", "tasks"):
                    work = functools.partial(self._run, header, arenas) if op == "run" else functools.partial(self._look_up, header)
                    running[key] = task = asyncio.create_task(self._answer(key, work, writer))
                    task.add_done_callback(functools.partial(self._finished, running, key, writer))
                elif op == "cancel" and key in running:
                    running[key].cancel()
                elif op == "ack" and key in self._acks and not self._acks[key][1].done():
                    self._acks[key][1].set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front end left
        except ProtocolError as exc:
            log.error("a front end sent a malformed message, closing its connection: %s", exc)
        finally:
            del self._front_ends[writer]
            for _, acked in [ack for ack in self._acks.values() if ack[0] is writer]:
                if not acked.done():  # a front end that left has nothing to take: no admin call waits for it
                    acked.set_result(None)
            for task in list(running.values()):
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            for view in arenas.values():
                with contextlib.suppress(BufferError):  # a dropped job's view may still be alive: the mapping goes with it
                    view.close()
            writer.close()

    @staticmethod
    def _finished(running: dict[int, asyncio.Task], key: int, writer: asyncio.StreamWriter, task: asyncio.Task) -> None:
        """A cancelled run (it may never have started) is answered here, so the front end frees its regions."""
        running.pop(key, None)
        if task.cancelled():
            with contextlib.suppress(ConnectionError, RuntimeError):
                write_message(writer, {"id": key, "ok": False, "cancelled": True})

    async def _answer(self, key: int, work: Callable[[], Awaitable[tuple[dict, bytes]]], writer: asyncio.StreamWriter) -> None:
        """Send what `work()` answers, or the error it raised, as the reply to message `key`."""
        payload = b""
        try:
            reply, payload = await work()
            reply["ok"] = True
        except ServeError as exc:
            reply = error_header(exc)
        except Exception as exc:
            log.exception("a front end's request failed in the engine process")
            reply = error_header(ServeError(f"internal error in the engine process: {type(exc).__name__}"))
        with contextlib.suppress(ConnectionError):
            write_message(writer, reply | {"id": key}, payload)
            await writer.drain()

    async def _run(self, header: dict, arenas: dict[str, ArenaView]) -> tuple[dict, bytes]:
        name = header["arena"]
        view = arenas.get(name) or arenas.setdefault(name, ArenaView(name))
        images = [view.image(Region(r["offset"], r["size"], tuple(r["shape"]))) for r in header["images"]]
        task, version = header["task"], header["version"]
        manifest = (await self.catalog.version(task, version)).manifest
        run = await self.engine.run(task, version, manifest, images, header["pinned"])
        outputs, payload = pack_outputs(run.predictions)
        reply = {"version": run.version, "queue_s": run.queue_s, "inference_s": run.inference_s, "outputs": outputs}
        if run.version != version:  # it gave way to the version the task serves now: the front end gets its manifest
            reply["manifest"] = run.manifest.model_dump(mode="json")
        return reply, payload

    async def _look_up(self, header: dict) -> tuple[dict, bytes]:
        """A task's entry (pulled from the store if the catalog lacks it), or every task's name, in the payload."""
        if header["op"] == "tasks":
            return {}, json.dumps(sorted(self.catalog)).encode()
        try:
            entry = await self.catalog.entry(str(header["task"]), header.get("version"))
        except UnknownTask:
            return {"found": False}, b""
        return {"found": True}, entry_to_json(entry)


class RemoteEngine:
    """The `EngineClient` of a front-end process: images into its arena, a `run` message, the answer;
    lookups in the engine's catalog, and its changes handed to `task_changed` in the order they came."""

    def __init__(self, path: str, arena: Arena, task_changed: TaskChanged) -> None:
        self.path, self.arena, self.task_changed = path, arena, task_changed
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future, list[Region]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._replies: asyncio.Task | None = None

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._replies = asyncio.create_task(self._read_replies(reader))

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the connection to the engine ends (its process left, or `close`)."""
        self._replies.add_done_callback(lambda _: callback())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._replies is not None:
            await asyncio.gather(self._replies, return_exceptions=True)

    async def task_names(self) -> list[str]:
        """Every task the engine's catalog holds."""
        _, payload = await self._ask({"op": "tasks"})
        return [str(name) for name in json.loads(payload)]

    async def lookup(self, task: str, version: int | None = None) -> TaskEntry | None:
        """`task`'s entry as the engine's catalog has it (read from the store there on a miss), or None."""
        header, payload = await self._ask({"op": "lookup", "task": task, "version": version})
        return entry_from_json(payload) if header["found"] else None

    async def run(self, task: str, version: int, manifest: Manifest, images: list[torch.Tensor], pinned: bool) -> EngineRun:
        regions = []
        for image in images:
            region = self.arena.put(image.cpu())
            if region is None:
                for taken in regions:
                    self.arena.free(taken)
                raise Overloaded(f"the shared images in flight fill this front end's {self.arena.size >> 20} MiB arena; retry shortly", 1)
            regions.append(region)
        message = {"op": "run", "task": task, "version": version, "pinned": pinned, "arena": self.arena.name}
        header, payload = await self._ask(message | {"images": [asdict(r) for r in regions]}, regions)
        ran = header["version"]
        return EngineRun(
            ran,
            manifest if ran == version else Manifest.model_validate(header["manifest"]),
            unpack_outputs(header["outputs"], payload),
            header["queue_s"],
            header["inference_s"],
        )

    async def _ask(self, message: dict, regions: list[Region] | None = None) -> tuple[dict, bytes]:
        """Send `message` (which names `regions` of the arena, freed with its answer) and await that answer;
        raise the error it brings."""
        key = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[key] = (answer, regions or [])
        try:
            if self._replies is None or self._replies.done():
                raise ConnectionResetError("the connection is closed")
            write_message(self._writer, message | {"id": key})
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._release(key)
            raise engine_gone(type(exc).__name__) from None
        try:
            header, payload = await answer
        except asyncio.CancelledError:  # the request gave up: the engine drops the job and says so, then the regions are freed
            with contextlib.suppress(ConnectionError, RuntimeError):
                write_message(self._writer, {"op": "cancel", "id": key})
            raise
        if not header.get("ok"):
            raise_error(header)
        return header, payload

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        why = "connection closed"
        try:
            while True:
                header, payload = await read_message(reader)
                if header.get("op") == "changed":  # taken here, in order with the answers to lookups
                    self._take_change(header, payload)
                    continue
                answer = self._release(header.get("id"))
                if answer is not None and not answer.done():
                    answer.set_result((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as exc:
            why = type(exc).__name__
        finally:  # whatever ended the connection, nothing still waiting on it is left waiting
            for key in list(self._pending):
                answer = self._release(key)
                if not answer.done():
                    answer.set_exception(engine_gone(why))

    def _take_change(self, notice: dict, payload: bytes) -> None:
        """Take a task's new entry from the engine, then say so (even if taking it failed: the engine waits)."""
        try:
            self.task_changed(str(notice.get("task")), None if notice.get("gone") else entry_from_json(payload))
        except Exception:
            log.exception("taking the engine's change to %r failed", notice.get("task"))
        with contextlib.suppress(ConnectionError, RuntimeError):
            write_message(self._writer, {"op": "ack", "id": notice.get("id")})

    def _release(self, key: object) -> asyncio.Future | None:
        """Forget a message and free its regions: the engine will not read them again."""
        answer, regions = self._pending.pop(key, (None, []))
        for region in regions:
            self.arena.free(region)
        return answer
