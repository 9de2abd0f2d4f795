"""The registry in process: uploads that cannot load, stale store reads, purges in flight, byte budgets."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from monaserve.adapters import AdapterPackage, Backbone, IncompatibleAdapterError, expected_shapes
from monaserve.server.engine import Engine
from monaserve.server.errors import AdapterTooLarge, ConcurrentChange, TaskUnloaded, UnknownTask, UnknownVersion, VersionExists
from monaserve.server.metrics import Metrics
from monaserve.server.registry import Registry
from monaserve.server.store import AdapterStore, ServingState

from helpers import TINY, random_adapter_tensors, random_package


def make_registry(backbone, store_dir, slots=4, budget=None) -> Registry:
    return Registry(
        AdapterStore(store_dir),
        Engine(backbone, num_slots=slots),
        ThreadPoolExecutor(1),
        Metrics(),
        cpu_cache_bytes=2**30,
        gpu_budget_bytes=budget,
        admission_timeout_s=5,
    )


async def serving(registry: Registry, task: str) -> tuple:
    """The version and manifest an unpinned request for `task` runs."""
    target = await registry.catalog.serving(task)
    return target.version, target.manifest


def test_an_upload_that_cannot_load_stores_nothing(tiny_backbone, shared_backbone, tmp_path):
    async def scenario():
        registry = make_registry(tiny_backbone, tmp_path)
        await registry.upload("pets", random_package(shared_backbone, "pets", seed=1).to_bytes())
        manifest = random_package(shared_backbone, "pets", seed=2, version=2).manifest
        narrow = manifest.model_copy(update={"mona_inner_dim": 32})
        tensors = random_adapter_tensors(expected_shapes(narrow, shared_backbone), seed=0)
        with pytest.raises(IncompatibleAdapterError, match="inner dim 32"):
            await registry.upload("pets", AdapterPackage(narrow, tensors).to_bytes())
        assert list(registry.store.versions("pets")) == [1]
        assert registry.catalog["pets"].serving == 1
        entry, version = await registry.upload("pets", random_package(shared_backbone, "pets", seed=2, version=2).to_bytes())
        assert (version, entry.serving, sorted(entry.versions)) == (2, 2, [1, 2])

    asyncio.run(scenario())


def test_an_adapter_over_the_budget_is_refused_before_it_is_stored(tiny_backbone, shared_backbone, tmp_path):
    async def scenario():
        registry = make_registry(tiny_backbone, tmp_path, budget=2**20)
        with pytest.raises(AdapterTooLarge):
            await registry.upload("big", random_package(shared_backbone, "big", seed=1).to_bytes())
        assert not registry.store.versions("big") and "big" not in registry.catalog

    asyncio.run(scenario())


def test_store_reads_that_overlap_uploads_never_win(tiny_backbone, shared_backbone, tmp_path):
    async def scenario():
        registry = make_registry(tiny_backbone, tmp_path)
        await registry.upload("t", random_package(shared_backbone, "t", seed=0).to_bytes())
        for version in range(2, 8):
            data = random_package(shared_backbone, "t", seed=version, version=version).to_bytes()
            await asyncio.gather(registry.refresh(), registry.upload("t", data), registry.refresh())
            entry = registry.catalog["t"]
            assert entry.serving == version and sorted(entry.versions) == list(range(1, version + 1))
            version_now, _ = await serving(registry, "t")
            assert version_now == version

    asyncio.run(scenario())


def test_purge_and_reupload_while_a_request_holds_the_old_weights(tiny_backbone, shared_backbone, tmp_path):
    async def scenario():
        registry = make_registry(tiny_backbone, tmp_path)
        old = random_package(shared_backbone, "p", seed=1, num_labels=5)
        await registry.upload("p", old.to_bytes())
        version, manifest = await serving(registry, "p")
        held = await registry.acquire("p", version, manifest)
        await registry.unload("p", purge=True)
        with pytest.raises(UnknownTask):
            await serving(registry, "p")
        with pytest.raises(UnknownVersion):  # a request that resolved before the purge cannot reload it
            await registry.acquire("p", version, manifest)
        new = random_package(shared_backbone, "p", seed=2, num_labels=3)
        await registry.upload("p", new.to_bytes())
        version, manifest = await serving(registry, "p")
        fresh = await registry.acquire("p", version, manifest)
        assert fresh.slot != held.slot
        assert registry.engine.manifests[fresh.slot].labels == new.manifest.labels
        assert registry.engine.manifests[held.slot].labels == old.manifest.labels  # still running on it
        registry.release(held)
        assert registry.engine.manifests[held.slot] is None and held.slot in registry.slots.free
        registry.release(fresh)
        assert registry.slots.residents[("p", 1)] is fresh.resident

    asyncio.run(scenario())


def test_the_idle_adapter_evicted_is_the_policys_choice(tiny_weights, shared_backbone, tmp_path):
    """Two slots, three tasks: by default the least recently used idle adapter makes room; another
    policy (here: the most recently used) changes only which one."""

    class MostRecentlyUsed:
        def choose(self, idle):
            return max(idle, key=lambda resident: resident.last_used)

    async def scenario(policy):
        for name in ("a", "b", "c"):
            random_package(shared_backbone, name, seed=1).save(tmp_path / name / "1.safetensors")
        registry = make_registry(Backbone.load(TINY, tiny_weights), tmp_path, slots=2)
        if policy is not None:
            registry.slots.policy = policy
        for name in ("a", "b", "c"):
            manifest = (await registry.catalog.entry(name)).versions[1].manifest
            registry.release(await registry.acquire(name, 1, manifest))
        return sorted(task for task, _ in registry.slots.residents)

    assert asyncio.run(scenario(None)) == ["b", "c"]
    assert asyncio.run(scenario(MostRecentlyUsed())) == ["a", "c"]


def test_concurrent_loads_respect_the_byte_budget(tiny_backbone, shared_backbone, tmp_path):
    async def scenario():
        for name in ("a", "b"):
            random_package(shared_backbone, name, seed=1).save(tmp_path / name / "1.safetensors")
        registry = make_registry(tiny_backbone, tmp_path, slots=4)
        await registry.ensure_loaded(("a", 1))
        per_adapter = registry.slots.resident_bytes()
        registry.slots.evict(registry.slots.residents[("a", 1)])
        registry.slots.budget_bytes = int(per_adapter * 1.5)
        peaks = []
        original = registry.engine.install

        def watching_install(slot, package):
            peaks.append(registry.slots.resident_bytes())
            original(slot, package)

        registry.engine.install = watching_install
        await asyncio.gather(registry.ensure_loaded(("a", 1)), registry.ensure_loaded(("b", 1)))
        assert max(peaks) <= registry.slots.budget_bytes
        assert len(registry.slots.residents) == 1 and registry.slots.resident_bytes() <= registry.slots.budget_bytes

    asyncio.run(scenario())


def test_load_after_unload_keeps_a_resident_that_requests_still_hold(tiny_backbone, shared_backbone, tmp_path):
    async def scenario():
        registry = make_registry(tiny_backbone, tmp_path)
        await registry.upload("u", random_package(shared_backbone, "u", seed=1).to_bytes())
        version, manifest = await serving(registry, "u")
        lease = await registry.acquire("u", version, manifest)
        await registry.unload("u")
        await registry.load("u")
        registry.release(lease)
        assert ("u", 1) in registry.slots.residents and registry.catalog["u"].enabled

    asyncio.run(scenario())


def test_tasks_may_use_their_own_input_size(tiny_backbone, shared_backbone):
    engine = Engine(tiny_backbone, num_slots=1)
    package = random_package(shared_backbone, "wide", seed=3)
    engine.install(0, package)
    outputs = engine.run(torch.randn(2, 3, 256, 320), [0, 0])
    assert [tuple(o.shape) for o in outputs] == [(5,), (5,)]


def test_replicas_sharing_a_store_see_uploads_purges_and_versions_stored_anew(tiny_weights, shared_backbone, tmp_path):
    """Two registries on one store directory, as two replicas: B learns of A's changes on refresh."""

    async def scenario():
        a = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        b = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        await a.upload("pets", random_package(shared_backbone, "pets", seed=1).to_bytes())
        await b.load("pets")
        assert ("pets", 1) in b.slots.residents

        await a.upload("pets", random_package(shared_backbone, "pets", seed=2, version=2).to_bytes())
        await b.refresh()
        assert b.catalog["pets"].serving == 2
        await asyncio.sleep(0.5)  # the new version preloads in the background where the task was in use
        assert ("pets", 2) in b.slots.residents

        await a.unload("pets", purge=True)
        await b.refresh()
        assert "pets" not in b.catalog and not any(key[0] == "pets" for key in b.slots.residents)
        assert ("pets", 1) not in b.loader.cache

        # the same version number comes back with other weights: B must not serve what it had
        await a.upload("pets", random_package(shared_backbone, "pets", seed=3, num_labels=7).to_bytes())
        await b.refresh()
        lease = await b.acquire("pets", 1, b.catalog["pets"].versions[1].manifest)
        assert b.engine.manifests[lease.slot].labels == [f"pets-class-{i}" for i in range(7)]
        b.release(lease)
        old = b.slots.residents[("pets", 1)]

        # purged and stored anew between two refreshes of B: the file's signature gives it away
        await a.unload("pets", purge=True)
        await a.upload("pets", random_package(shared_backbone, "pets", seed=4, num_labels=3).to_bytes())
        await b.refresh()
        assert b.slots.residents.get(("pets", 1)) is not old
        lease = await b.acquire("pets", 1, b.catalog["pets"].versions[1].manifest)
        assert len(b.engine.manifests[lease.slot].labels) == 3
        b.release(lease)

    asyncio.run(scenario())


def test_an_upload_replaces_weights_held_from_before_a_purge_elsewhere(tiny_weights, shared_backbone, tmp_path):
    """B holds v1; A purges the task; v1 comes back through B before B refreshed: B serves the new v1."""

    async def scenario():
        a = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        b = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        await b.upload("pets", random_package(shared_backbone, "pets", seed=1).to_bytes())
        await a.refresh()
        await a.unload("pets", purge=True)
        await b.upload("pets", random_package(shared_backbone, "pets", seed=2, num_labels=6).to_bytes())
        lease = await b.acquire("pets", 1, b.catalog["pets"].versions[1].manifest)
        assert len(b.engine.manifests[lease.slot].labels) == 6
        b.release(lease)

    asyncio.run(scenario())


def test_serving_state_is_shared_through_the_store_and_survives_a_restart(tiny_weights, shared_backbone, tmp_path):
    """A rollback and an unload made on A are what B serves after a refresh, and what a registry made
    anew over the store (a restart) serves; an upload newer than a pinned version moves the task on."""

    async def scenario():
        a = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        b = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        for version in (1, 2):
            await a.upload("pets", random_package(shared_backbone, "pets", seed=version, version=version).to_bytes())
        assert not (tmp_path / "pets" / "serving.json").exists()  # following the newest needs no file
        await a.load("pets", 1)  # rollback
        await b.refresh()
        assert (a.catalog["pets"].serving, b.catalog["pets"].serving) == (1, 1)
        assert ServingState.from_json((tmp_path / "pets" / "serving.json").read_bytes()) == ServingState(1, True)

        await b.unload("pets")
        await a.refresh()
        for registry in (a, b, make_registry(Backbone.load(TINY, tiny_weights), tmp_path)):
            await registry.refresh()
            with pytest.raises(TaskUnloaded):
                await registry.catalog.serving("pets", 1)  # pinned requests too
        await a.load("pets")
        restarted = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        await restarted.refresh()
        assert restarted.catalog["pets"].enabled and restarted.catalog["pets"].serving == 2

        await a.load("pets", 1)
        await a.upload("pets", random_package(shared_backbone, "pets", seed=3, version=3).to_bytes())
        await b.refresh()
        assert (
            b.catalog["pets"].serving == 3 and ServingState.from_json((tmp_path / "pets" / "serving.json").read_bytes()) == ServingState()
        )

    asyncio.run(scenario())


def test_an_unloaded_task_frees_its_slots_on_other_replicas(tiny_weights, shared_backbone, tmp_path):
    async def scenario():
        a = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        b = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        await a.upload("pets", random_package(shared_backbone, "pets", seed=1).to_bytes())
        await b.load("pets")
        await a.unload("pets")
        await b.refresh()
        assert not any(key[0] == "pets" for key in b.slots.residents) and ("pets", 1) not in b.loader.cache

    asyncio.run(scenario())


def test_an_unusable_serving_state_file_is_logged_once_and_the_newest_serves(tiny_backbone, shared_backbone, tmp_path, caplog):
    async def scenario():
        random_package(shared_backbone, "pets", seed=1).save(tmp_path / "pets" / "1.safetensors")
        (tmp_path / "pets" / "serving.json").write_text('{"version": "one"}')
        registry = make_registry(tiny_backbone, tmp_path)
        await registry.refresh()
        await registry.refresh()
        assert registry.catalog["pets"].serving == 1 and registry.catalog["pets"].enabled

    asyncio.run(scenario())
    assert len([r for r in caplog.records if "serving.json" in r.getMessage()]) == 1


def test_a_purge_that_removes_the_folder_under_an_upload_is_a_409(shared_backbone, tmp_path, monkeypatch):
    """Another replica's purge deletes the task folder while this one links its temp file into place."""
    import os
    import shutil

    store = AdapterStore(tmp_path)
    real_link = os.link

    def purge_first(source, target):
        shutil.rmtree(tmp_path / "pets")
        real_link(source, target)

    monkeypatch.setattr(os, "link", purge_first)
    with pytest.raises(ConcurrentChange, match="purged while v1 was being stored"):
        store.write("pets", 1, random_package(shared_backbone, "pets", seed=1).to_bytes())
    assert not (tmp_path / "pets").exists()


def test_temp_files_left_by_a_killed_writer_are_removed_when_stale(shared_backbone, tmp_path):
    import os
    import time

    store = AdapterStore(tmp_path)
    random_package(shared_backbone, "pets", seed=1).save(tmp_path / "pets" / "1.safetensors")
    stale, fresh, other = (
        tmp_path / "pets" / ".2.safetensors.abc123.tmp",
        tmp_path / "pets" / ".3.safetensors.def456.tmp",
        tmp_path / "pets" / ".notes.tmp",
    )
    for path in (stale, fresh, other):
        path.write_bytes(b"\0" * 100)
    hour_ago = time.time() - 3600
    for path in (stale, other):
        os.utime(path, (hour_ago, hour_ago))
    assert store.remove_stale_temp_files() == 1
    assert not stale.exists() and fresh.exists() and other.exists()  # a live writer's file, and one not ours


def test_a_serving_state_for_a_purged_folder_is_a_409_and_makes_no_folder(tmp_path):
    with pytest.raises(ConcurrentChange, match="purged while its serving state"):
        AdapterStore(tmp_path).write_state("gone", ServingState(1, True))
    assert not (tmp_path / "gone").exists()


def test_uploads_through_two_replicas_at_once_take_the_next_versions_in_turn(tiny_weights, shared_backbone, tmp_path):
    """B lists the store before A's upload is stored, so both pick v1: A stores it, and B, refused by the
    store, takes v2 instead of answering 409; an upload that asked for v1 is refused."""

    async def scenario():
        a = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        b = make_registry(Backbone.load(TINY, tiny_weights), tmp_path)
        listed, a_stored = asyncio.Event(), asyncio.Event()
        listing = b.store.listing

        def listing_before_a_stores(task):
            seen = listing(task)
            listed.set()
            return seen

        b.store.listing = listing_before_a_stores

        async def upload_a_after_b_listed():
            await listed.wait()
            try:
                return await a.upload("pets", random_package(shared_backbone, "pets", seed=1).to_bytes())
            finally:
                a_stored.set()

        write = b.store.write

        def write_after_a(task, version, data):
            asyncio.run_coroutine_threadsafe(a_stored.wait(), loop).result()
            return write(task, version, data)

        loop = asyncio.get_running_loop()
        b.store.write = write_after_a
        (entry_a, version_a), (entry_b, version_b) = await asyncio.gather(
            upload_a_after_b_listed(), b.upload("pets", random_package(shared_backbone, "pets", seed=2).to_bytes())
        )
        assert (version_a, version_b) == (1, 2) and entry_b.serving == 2
        await b.refresh()
        assert sorted(b.catalog["pets"].versions) == [1, 2]
        assert [AdapterPackage.read(tmp_path / "pets" / f"{v}.safetensors").manifest.version for v in (1, 2)] == [1, 2]
        assert ("pets", 1) not in b.slots.residents  # what B loaded as v1 was let go when the store refused it
        b.store.write = write
        with pytest.raises(VersionExists, match="leave the version out to store this upload as v3"):
            await b.upload("pets", random_package(shared_backbone, "pets", seed=3).to_bytes(), version=1)

    asyncio.run(scenario())
