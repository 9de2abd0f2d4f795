"""The adapter package format: round trip, atomic writes, and a named error for each way a file can be wrong."""

from __future__ import annotations

import io
import json
import os
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from monaserve.adapters import (
    AdapterPackage,
    Backbone,
    IncompatibleAdapterError,
    PackageFormatError,
    check_compatible,
    read_manifest,
    validate_task_name,
    with_version,
)
from monaserve.adapters import package as package_module
from monaserve.adapters.package import METADATA_KEY

from helpers import make_manifest, random_package
from server_harness import image_bytes


@pytest.fixture(scope="module")
def package(shared_backbone: Backbone) -> AdapterPackage:
    """A valid package (read-only: tests that change one make a copy)."""
    return random_package(shared_backbone, "flowers", seed=0)


def raw_with_manifest(package: AdapterPackage, manifest_json: str | None) -> bytes:
    """Serialise `package`'s tensors with an arbitrary (possibly broken) manifest string."""
    metadata = None if manifest_json is None else {METADATA_KEY: manifest_json}
    return safetensors.torch.save(package.tensors, metadata=metadata)


def manifest_dict(package: AdapterPackage) -> dict:
    return json.loads(package.manifest.model_dump_json())


def test_manifest_from_the_header_alone(tmp_path, package):
    path = package.save(tmp_path / "1.safetensors")
    assert read_manifest(path) == package.manifest
    (tmp_path / "bad").write_bytes(b"\x80\x04junk")
    with pytest.raises(PackageFormatError, match="not a safetensors file"):
        read_manifest(tmp_path / "bad")


def test_round_trip_through_a_file(tmp_path, package, shared_backbone):
    path = package.save(tmp_path / "flowers" / "1.safetensors")
    loaded = AdapterPackage.read(path)
    assert loaded.manifest == package.manifest
    assert loaded.tensors.keys() == package.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], package.tensors[k]) for k in package.tensors)
    check_compatible(loaded, shared_backbone)
    assert loaded.nbytes == (1_408_128 + 2 * 768 + 769 * 5) * 4
    with safetensors.safe_open(path, framework="pt") as f:  # a plain safetensors file for any reader
        assert json.loads(f.metadata()[METADATA_KEY])["name"] == "flowers"
    assert [p.name for p in path.parent.iterdir()] == ["1.safetensors"]


def test_failed_save_leaves_the_previous_file_and_no_temp(tmp_path, package, monkeypatch, shared_backbone):
    path = package.save(tmp_path / "1.safetensors")
    before = path.read_bytes()
    other = random_package(shared_backbone, "flowers", seed=1)

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        other.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["1.safetensors"]


@pytest.mark.parametrize(
    "name",
    ["Bad", "../etc/passwd", "a" * 65, "", "-lead", "_lead", "naïve", "ｆｕｌｌ", "a b", "a/b", "a.b", "x\n"],
)
def test_bad_task_names_are_refused(name, package):
    with pytest.raises(ValueError, match="invalid task name"):
        validate_task_name(name)
    data = manifest_dict(package) | {"name": name}
    with pytest.raises(PackageFormatError, match=r"invalid manifest: name: String should match pattern"):
        AdapterPackage.from_bytes(raw_with_manifest(package, json.dumps(data)))


@pytest.mark.parametrize("name", ["a", "0", "flowers", "coco-2017_det", "x" * 64])
def test_good_task_names(name):
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "latest"}, "version: Input should be a valid integer"),
        ({"version": 0}, "version: Input should be greater than or equal to 1"),
        ({"labels": []}, "labels: List should have at least 1 item"),
        ({"labels": ["a", "b", "a"]}, "labels must be unique; repeated: ['a']"),
        ({"kind": "segmentation"}, "kind: Input should be 'classify'"),
        ({"backbone": {"name": "x", "fingerprint": "md5:00"}}, "backbone.fingerprint: String should match pattern"),
        ({"input": {"size": [224, 225]}}, "input.size.1: Input should be a multiple of 32"),
        ({"input": {"size": [224, 224], "std": [0.2, 0.0, 0.2]}}, "input.std.1: Input should be greater than 0"),
        ({"created_at": "2026-01-01T00:00:00"}, "created_at: Input should have timezone info"),
        ({"mona_inner_dim": -1}, "mona_inner_dim: Input should be greater than or equal to 1"),
        ({"format": "other/9"}, "format: Input should be 'monaserve.adapter/1'"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ],
)
def test_malformed_manifests_name_the_field(change, message, package):
    data = manifest_dict(package) | change
    with pytest.raises(PackageFormatError) as info:
        AdapterPackage.from_bytes(raw_with_manifest(package, json.dumps(data)))
    assert str(info.value).startswith("invalid manifest:")
    assert message in str(info.value)


def test_missing_manifest(package):
    with pytest.raises(PackageFormatError, match="no manifest"):
        AdapterPackage.from_bytes(raw_with_manifest(package, None))


def test_manifest_that_is_not_json(package):
    with pytest.raises(PackageFormatError, match="invalid manifest: manifest: Invalid JSON"):
        AdapterPackage.from_bytes(raw_with_manifest(package, "{not json"))


@pytest.mark.parametrize(("value", "label"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "-Inf")])
def test_non_finite_tensors_are_named(value, label, package):
    tensors = dict(package.tensors)
    name = "layers.2.blocks.3.mona2.project1.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][5, 7] = value
    bad = AdapterPackage(package.manifest, tensors)
    with pytest.raises(PackageFormatError, match=f"NaN or Inf values: {name}"):
        AdapterPackage.from_bytes(bad.to_bytes())


def test_integer_tensors_are_refused(package):
    tensors = dict(package.tensors)
    tensors["head.fc.bias"] = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(PackageFormatError, match=r"float32/float16/bfloat16; not so: head.fc.bias \(torch.int64\)"):
        AdapterPackage.from_bytes(AdapterPackage(package.manifest, tensors).to_bytes())


def test_half_precision_packages_are_accepted(package, shared_backbone):
    half = AdapterPackage(package.manifest, {k: v.to(torch.bfloat16) for k, v in package.tensors.items()})
    check_compatible(AdapterPackage.from_bytes(half.to_bytes()), shared_backbone)


def _torch_save_bytes(obj, zipfile: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zipfile)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _torch_save_bytes(p.tensors, zipfile=False), "looks like a Python pickle"),
        (lambda p: _torch_save_bytes(p.tensors, zipfile=True), "looks like a zip archive"),
        (lambda p: b"", "too short for a header"),
        (lambda p: b"\x01\x02", "too short for a header"),
        (lambda p: struct.pack("<Q", 2**40) + b"{}", "header length 1099511627776 exceeds"),
        (lambda p: struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not JSON"),
        (lambda p: struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
        (lambda p: struct.pack("<Q", 200_000) + b"[" * 200_000, "header is not JSON"),
        (lambda p: p.to_bytes()[:-100], "the package is truncated: .* of the .* bytes its header describes"),
        (lambda p: image_bytes(0), "not a safetensors file: it looks like a JPEG image"),
        (lambda p: image_bytes(0, fmt="PNG"), "not a safetensors file: it looks like a PNG image"),
    ],
)
def test_files_that_are_not_packages(make, message, package):
    with pytest.raises(PackageFormatError, match=message):
        AdapterPackage.from_bytes(make(package))


def test_header_offsets_past_the_end(package):
    data = bytearray(package.to_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    encoded = json.dumps(header).encode()
    corrupt = struct.pack("<Q", len(encoded)) + encoded + bytes(data[8 + length :])
    with pytest.raises(PackageFormatError, match="the package is truncated"):  # as far as its header can tell
        AdapterPackage.from_bytes(corrupt)


def test_oversized_packages_are_refused_before_parsing(package, monkeypatch, tmp_path):
    monkeypatch.setattr(package_module, "MAX_PACKAGE_BYTES", 1000)
    with pytest.raises(PackageFormatError, match="the limit is 1000"):
        AdapterPackage.from_bytes(package.to_bytes())
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * 1001)
    with pytest.raises(PackageFormatError, match="the limit is 1000"):
        AdapterPackage.read(path)


def test_other_backbone_weights_name_both_fingerprints(package, shared_backbone):
    other = Backbone.load("swin_tiny_patch4_window7_224", "random", seed=99)
    with pytest.raises(IncompatibleAdapterError) as info:
        check_compatible(package, other)
    message = str(info.value)
    assert "adapter 'flowers' v1 was trained on other weights" in message
    assert shared_backbone.fingerprint[7:19] in message and other.fingerprint[7:19] in message


def test_other_backbone_architecture(package, shared_backbone):
    manifest = package.manifest.model_copy(
        update={"backbone": package.manifest.backbone.model_copy(update={"name": "swin_small_patch4_window7_224"})}
    )
    with pytest.raises(IncompatibleAdapterError, match="trained on backbone 'swin_small_patch4_window7_224'"):
        check_compatible(AdapterPackage(manifest, package.tensors), shared_backbone)


def test_tagged_backbone_name_matches_its_architecture(package, shared_backbone):
    ref = package.manifest.backbone.model_copy(update={"name": "swin_tiny_patch4_window7_224.ms_in1k"})
    check_compatible(AdapterPackage(package.manifest.model_copy(update={"backbone": ref}), package.tensors), shared_backbone)


def test_missing_unexpected_and_misshapen_tensors_are_listed(package, shared_backbone):
    tensors = dict(package.tensors)
    del tensors["layers.0.blocks.1.mona2.gamma"]
    tensors["layers.9.blocks.0.mona1.gamma"] = torch.ones(96)
    tensors["head.fc.weight"] = torch.zeros(6, 768)
    with pytest.raises(IncompatibleAdapterError) as info:
        check_compatible(AdapterPackage(package.manifest, tensors), shared_backbone)
    message = str(info.value)
    assert "missing tensors: layers.0.blocks.1.mona2.gamma" in message
    assert "unexpected tensors: layers.9.blocks.0.mona1.gamma" in message
    assert "wrong shapes: head.fc.weight is (6, 768), expected (5, 768)" in message


def test_labels_must_match_the_head(shared_backbone, package):
    manifest = make_manifest(shared_backbone, "flowers", num_labels=7)
    with pytest.raises(IncompatibleAdapterError, match=r"head.fc.bias is \(5,\), expected \(7,\)"):
        check_compatible(AdapterPackage(manifest, package.tensors), shared_backbone)


def test_a_package_with_another_version_keeps_its_tensors_and_the_rest_of_its_manifest(package):
    data = package.to_bytes()
    renumbered = AdapterPackage.from_bytes(with_version(data, 42))
    assert renumbered.manifest == package.manifest.model_copy(update={"version": 42})
    assert renumbered.tensors.keys() == package.tensors.keys()
    assert all(torch.equal(renumbered.tensors[name], tensor) for name, tensor in package.tensors.items())
    assert struct.unpack("<Q", with_version(data, 42)[:8])[0] % 8 == 0  # the header stays 8-byte aligned, as safetensors writes it
