"""The adapter store on a local directory and on a real S3 API (moto's server): the same contract."""

from __future__ import annotations

import itertools
import time

import pytest

from helpers import random_package
from monaserve.adapters import AdapterError
from monaserve.server.errors import VersionExists
from monaserve.server.store import AdapterStore

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
