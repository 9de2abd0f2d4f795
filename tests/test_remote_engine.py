"""An engine in another process's place: `RemoteEngine` -> Unix socket and shared memory ->
`EngineService` -> the real `LocalEngine`, giving what the local engine gives, with errors, cancels
and a vanished engine each answered as the data plane expects."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.adapters.transforms import preprocess
from monaserve.server.config import ServeConfig
from monaserve.server.errors import BadRequest, EngineUnavailable, Overloaded, UnknownVersion
from monaserve.server.remote_engine import EngineService, RemoteEngine
from monaserve.server.runtime import Runtime
from monaserve.server.shm_arena import Arena

from helpers import random_package
from server_harness import store_of

SIZE = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_backbone):
    packages = [
        random_package(shared_backbone, name, seed=i, input=InputSpec(size=(SIZE, SIZE))) for i, name in enumerate(["cls", "other"])
    ]
    return store_of(tmp_path_factory, packages)


def images(count: int) -> list[torch.Tensor]:
    spec = InputSpec(size=(SIZE, SIZE))
    return [preprocess(Image.effect_noise((SIZE + i, SIZE), 40 + i).convert("RGB"), spec).tensor for i in range(count)]


def take_nothing(task: str, entry) -> None:
    pass


async def with_remote(tiny_weights, store, tmp_path, check, arena_bytes: int = 1 << 20) -> None:
    runtime = Runtime(ServeConfig(weights=str(tiny_weights), store=str(store), device="cpu", max_delay_ms=1))
    await runtime.start()

    async def manifest_of(task: str, version: int):
        return (await runtime.registry.catalog.version(task, version)).manifest

    service = EngineService(str(tmp_path / "engine.sock"))
    await service.start(runtime.engine_client, runtime.registry.catalog)
    arena = Arena(arena_bytes)
    remote = RemoteEngine(service.path, arena, take_nothing)
    await remote.connect()
    try:
        await check(runtime, service, remote, arena, manifest_of)
    finally:
        await remote.close()
        await service.stop()
        await runtime.stop()
        arena.close()


def test_a_remote_run_gives_the_local_engines_outputs_and_frees_its_shared_memory(tiny_weights, store, tmp_path):
    async def check(runtime, service, remote, arena, manifest_of):
        manifest = await manifest_of("cls", 1)
        batch = images(3)
        local = await runtime.engine_client.run("cls", 1, manifest, batch, True)
        ran = await remote.run("cls", 1, manifest, batch, True)
        assert (ran.version, ran.manifest) == (1, manifest)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ran.predictions, local.predictions))
        manifests = {t: await manifest_of(t, 1) for t in ("cls", "other")}
        both = await asyncio.gather(*(remote.run(t, 1, m, images(2), True) for t, m in manifests.items()))
        assert [len(r.predictions) for r in both] == [2, 2]
        assert arena.free_bytes == arena.size

    asyncio.run(with_remote(tiny_weights, store, tmp_path, check))


def test_errors_cross_as_themselves_and_a_full_arena_is_a_503(tiny_weights, store, tmp_path):
    async def check(runtime, service, remote, arena, manifest_of):
        manifest = await manifest_of("cls", 1)
        with pytest.raises(UnknownVersion):
            await remote.run("cls", 9, manifest, images(1), True)
        with pytest.raises(Overloaded, match="arena"):
            await remote.run("cls", 1, manifest, images(1) * 30, True)  # 30 x 12 KiB > 256 KiB
        assert arena.free_bytes == arena.size

    asyncio.run(with_remote(tiny_weights, store, tmp_path, check, arena_bytes=256 << 10))


def test_a_cancelled_run_frees_its_regions_once_the_engine_lets_go_and_a_vanished_engine_is_a_503(tiny_weights, store, tmp_path):
    async def check(runtime, service, remote, arena, manifest_of):
        manifest = await manifest_of("cls", 1)
        run = asyncio.create_task(remote.run("cls", 1, manifest, images(4), True))
        await asyncio.sleep(0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        for _ in range(200):  # the engine's acknowledgement frees the regions
            if arena.free_bytes == arena.size:
                break
            await asyncio.sleep(0.01)
        assert arena.free_bytes == arena.size
        await service.stop()
        remote._writer.transport.abort()  # the engine process is gone: the socket closes under the front end
        with pytest.raises(EngineUnavailable, match="engine process is not answering"):
            await remote.run("cls", 1, manifest, images(1), True)

    asyncio.run(with_remote(tiny_weights, store, tmp_path, check))


def test_lookups_answer_from_the_engines_catalog_and_errors_cross(tiny_weights, store, tmp_path):
    async def check(runtime, service, remote, arena, manifest_of):
        assert await remote.task_names() == ["cls", "other"]
        entry = await remote.lookup("cls")
        assert sorted(entry.versions) == [1] and entry.versions[1].manifest == await manifest_of("cls", 1)
        assert entry.state == runtime.registry.catalog["cls"].state
        assert await remote.lookup("nope") is None
        with pytest.raises(BadRequest, match="task name"):
            await remote.lookup("../etc")

    asyncio.run(with_remote(tiny_weights, store, tmp_path, check))


def test_a_change_reaches_every_front_end_before_it_returns_and_a_silent_one_is_waited_for_only_so_long(
    tiny_weights, store, tmp_path, monkeypatch
):
    from monaserve.server import remote_engine

    async def check(runtime, service, remote, arena, manifest_of):
        seen: list[tuple[str, str, list[int] | None]] = []

        def front_end(name: str) -> RemoteEngine:
            def take(task: str, entry) -> None:
                seen.append((name, task, None if entry is None else sorted(entry.versions)))

            return RemoteEngine(service.path, Arena(1 << 16), take)

        others = [front_end("a"), front_end("b")]
        for other in others:
            await other.connect()
        await asyncio.sleep(0.05)  # the service has taken both connections
        await service.changed("cls")
        assert sorted(seen) == [("a", "cls", [1]), ("b", "cls", [1])]
        await service.changed("gone")
        assert ("a", "gone", None) in seen and ("b", "gone", None) in seen
        monkeypatch.setattr(remote_engine, "ACK_TIMEOUT_S", 0.3)
        _, silent = await asyncio.open_unix_connection(service.path)  # a front end that never acknowledges
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        await service.changed("other")
        assert 0.25 < asyncio.get_running_loop().time() - started < 3
        assert ("a", "other", [1]) in seen and ("b", "other", [1]) in seen
        silent.close()
        for other in others:
            await other.close()
            other.arena.close()

    asyncio.run(with_remote(tiny_weights, store, tmp_path, check))


def test_a_mirror_drops_a_lookups_answer_that_a_change_overtook():
    from monaserve.server.catalog import TaskEntry
    from monaserve.server.front_end import CatalogMirror

    asked = asyncio.Event()
    answer: asyncio.Future

    async def look_up(task: str, version: int | None):
        asked.set()
        return await answer

    async def check() -> None:
        nonlocal answer
        answer = asyncio.get_running_loop().create_future()
        mirror = CatalogMirror(look_up)
        fetching = asyncio.create_task(mirror.fetch("cls"))
        await asked.wait()
        newer = TaskEntry("cls", {})
        mirror.take("cls", newer)  # a change arrives while the lookup is out
        answer.set_result(TaskEntry("cls", {}))  # the lookup's answer, from before that change
        assert await fetching is newer and mirror["cls"] is newer
        mirror.take("cls", None)
        assert "cls" not in mirror

    asyncio.run(check())
