"""The adapter store on a local directory and on a real S3 API (moto's server): the same contract."""

from __future__ import annotations

import itertools
import time

import pytest

from monaserve.adapters import AdapterError
from monaserve.server.errors import VersionExists
from monaserve.server.store import AdapterStore

from helpers import random_package
from server_harness import TOKEN, ServerProcess, image_bytes

_prefixes = itertools.count()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> AdapterStore:
    if request.param == "local":
        return AdapterStore(tmp_path / "store")
    request.getfixturevalue("s3_endpoint")
    return AdapterStore(f"s3://monaserve-test/store-{next(_prefixes)}")


def test_write_list_read_and_delete(store, shared_backbone):
    first = random_package(shared_backbone, "pets", seed=1).to_bytes()
    second = random_package(shared_backbone, "pets", seed=2, version=2).to_bytes()
    assert store.tasks() == [] and store.versions("pets") == {}
    stored = store.write("pets", 1, first)
    store.write("pets", 2, second)
    assert store.tasks() == ["pets"]
    versions = store.versions("pets")
    assert list(versions) == [1, 2] and versions[1] == stored and stored.size == len(first)
    assert store.read("pets", 2) == second
    assert store.manifest("pets", 2).version == 2
    store.delete("pets")
    assert store.tasks() == [] and store.versions("pets") == {}


def test_versions_are_immutable(store, shared_backbone):
    data = random_package(shared_backbone, "pets", seed=1).to_bytes()
    store.write("pets", 1, data)
    with pytest.raises(VersionExists, match="immutable"):
        store.write("pets", 1, random_package(shared_backbone, "pets", seed=9).to_bytes())
    assert store.read("pets", 1) == data


def test_a_version_stored_anew_gets_a_new_signature(store, shared_backbone):
    """After a purge, the same version number may come back with other weights: replicas must notice."""
    before = store.write("pets", 1, random_package(shared_backbone, "pets", seed=1).to_bytes())
    store.delete("pets")
    time.sleep(1.1)  # object stores stamp modification times in whole seconds
    after = store.write("pets", 1, random_package(shared_backbone, "pets", seed=2, num_labels=7).to_bytes())
    assert before.signature != after.signature == store.versions("pets")[1].signature


def test_a_file_under_the_wrong_path_is_refused(store, shared_backbone):
    store.write("pets", 3, random_package(shared_backbone, "cars", seed=1).to_bytes())
    with pytest.raises(AdapterError, match="name and version must match its path"):
        store.manifest("pets", 3)


def test_invalid_names_are_ignored_or_refused(store, shared_backbone):
    for folder, name in [("Bad Name!", "1.safetensors"), ("pets", "notes.txt")]:
        store.fs.makedirs(f"{store.root}/{folder}", exist_ok=True)
        store.fs.pipe_file(f"{store.root}/{folder}/{name}", b"x")
    store.write("pets", 1, random_package(shared_backbone, "pets", seed=1).to_bytes())
    assert store.tasks() == ["pets"] and list(store.versions("pets")) == [1]
    with pytest.raises(ValueError):
        store.path("../etc", 1)


@pytest.mark.process
def test_a_server_on_an_s3_store_serves_what_other_replicas_store(s3_endpoint, tiny_weights, shared_backbone, tmp_path):
    """`monaserve serve --store s3://...`: its uploads land in the bucket, and a version another replica
    writes there is served after the next catalog refresh."""
    url = f"s3://monaserve-test/store-{next(_prefixes)}"
    image = image_bytes(0, size=(64, 64))
    args = ("--catalog-refresh-s", "0.5")
    with ServerProcess(tiny_weights, url, *args, env={**s3_endpoint, "MONASERVE_ADMIN_TOKEN": TOKEN}, log=tmp_path / "log") as server:
        with server.client() as client:
            client.put("/v1/adapters/pets", content=random_package(shared_backbone, "pets", seed=1).to_bytes()).raise_for_status()
            other_replica = AdapterStore(url)
            assert list(other_replica.versions("pets")) == [1]
            other_replica.write("pets", 2, random_package(shared_backbone, "pets", seed=2, version=2).to_bytes())
            deadline = time.monotonic() + 30
            while client.post("/v1/tasks/pets/classify", content=image, headers={"content-type": "image/jpeg"}).json()["version"] != 2:
                assert time.monotonic() < deadline, "the version stored by another replica was never served"
                time.sleep(0.1)
            client.delete("/v1/adapters/pets", params={"purge": "true"}).raise_for_status()
            assert other_replica.versions("pets") == {}
