"""Hostile adapter packages through a real server: each refused with a 4xx before it reaches the store,
while the previous version keeps serving unchanged."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save

from monaserve.adapters import AdapterPackage, Backbone, expected_shapes

from app_harness import InProcessServer
from helpers import make_manifest, random_adapter_tensors, random_package
from server_harness import TOKEN, image_bytes, store_of

JPEG = {"content-type": "image/jpeg"}


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def edit_header(data: bytes, change) -> bytes:
    header, body = split(data)
    change(header)
    return join(header, body)


def edit_manifest(data: bytes, change) -> bytes:
    def apply(header):
        manifest = json.loads(header["__metadata__"]["monaserve.manifest"])
        change(manifest)
        header["__metadata__"]["monaserve.manifest"] = json.dumps(manifest)

    return edit_header(data, apply)


def first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


def with_tensors(backbone: Backbone, change) -> bytes:
    package = random_package(backbone, "pets", seed=5, version=2)
    tensors = dict(package.tensors)
    change(tensors)
    return save(tensors, metadata={"monaserve.manifest": package.manifest.model_dump_json()})


def zipped() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", pickle.dumps({"w": [1.0]}))
    return buffer.getvalue()


def other_backbone_package() -> bytes:
    other = Backbone.load("swin_tiny_patch4_window7_224", "random", seed=99)
    manifest = make_manifest(other, "pets", version=2)
    return AdapterPackage(manifest, random_adapter_tensors(expected_shapes(manifest, other), 1)).to_bytes()


HOSTILE = {
    "pickle": lambda good, b: pickle.dumps({"weights": [1.0, 2.0]}),
    "zip (torch.save)": lambda good, b: zipped(),
    "empty": lambda good, b: b"",
    "truncated": lambda good, b: good[: len(good) // 2],
    "header length huge": lambda good, b: struct.pack("<Q", 2**62) + good[8:],
    "offsets past the end": lambda good, b: edit_header(good, lambda h: h[first_tensor(h)].__setitem__("data_offsets", [0, len(good) * 4])),
    "overlapping offsets": lambda good, b: edit_header(
        good, lambda h: h[first_tensor(h)].__setitem__("data_offsets", [0, h[first_tensor(h)]["data_offsets"][1] + 8])
    ),
    "missing tensor": lambda good, b: with_tensors(b, lambda t: t.pop(sorted(t)[0])),
    "extra tensor": lambda good, b: with_tensors(b, lambda t: t.__setitem__("layers.0.blocks.0.mona1.extra", torch.zeros(3))),
    "wrong shape": lambda good, b: with_tensors(b, lambda t: t.__setitem__(sorted(t)[0], torch.zeros(2, 2))),
    "integer dtype": lambda good, b: with_tensors(b, lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]].to(torch.int32))),
    "NaN": lambda good, b: with_tensors(b, lambda t: t[sorted(t)[0]].view(-1).__setitem__(0, float("nan"))),
    "Inf": lambda good, b: with_tensors(b, lambda t: t[sorted(t)[-1]].view(-1).__setitem__(0, float("inf"))),
    "manifest version is text": lambda good, b: edit_manifest(good, lambda m: m.__setitem__("version", "two")),
    "manifest kind unknown": lambda good, b: edit_manifest(good, lambda m: m.__setitem__("kind", "rm -rf")),
    "manifest extra field": lambda good, b: edit_manifest(good, lambda m: m.__setitem__("exec", "import os")),
    "traversal in the name": lambda good, b: edit_manifest(good, lambda m: m.__setitem__("name", "../../etc")),
    "look-alike unicode name": lambda good, b: edit_manifest(good, lambda m: m.__setitem__("name", "p\u0435ts")),
    "another task's package": lambda good, b: edit_manifest(good, lambda m: m.__setitem__("name", "cats")),
    "another backbone's fingerprint": lambda good, b: other_backbone_package(),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    store = store_of(tmp_path_factory, [random_package(shared_backbone, "pets", seed=1)])
    with InProcessServer(tiny_weights, store, admin_token=TOKEN) as server:
        yield server


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_package_is_refused_and_nothing_changes(server, shared_backbone, name):
    good = random_package(shared_backbone, "pets", seed=5, version=2).to_bytes()
    payload = HOSTILE[name](good, shared_backbone)
    with server.client() as client:
        before = client.post("/v1/tasks/pets/classify", content=image_bytes(0), headers=JPEG).json()
        response = client.put("/v1/adapters/pets", content=payload)
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert set(response.json()) == {"error", "message"} and response.json()["message"]
        after = client.post("/v1/tasks/pets/classify", content=image_bytes(0), headers=JPEG).json()
    assert after["version"] == 1 and after["results"] == before["results"]
    assert sorted(p.relative_to(server.store).as_posix() for p in server.store.rglob("*") if p.is_file()) == ["pets/1.safetensors"]


@pytest.mark.parametrize(
    "path", ["/v1/adapters/..%2F..%2Fetc", "/v1/adapters/%2e%2e", "/v1/adapters/p%D0%B5ts", "/v1/adapters/" + "a" * 65]
)
def test_names_in_the_url_cannot_escape_the_store(server, path):
    with server.client() as client:
        response = client.put(path, content=b"x")
    assert response.status_code in (404, 422) and "error" in response.json()
    assert sorted(p.relative_to(server.store).as_posix() for p in server.store.rglob("*") if p.is_file()) == ["pets/1.safetensors"]
