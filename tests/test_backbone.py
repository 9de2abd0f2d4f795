"""Backbone creation from a seed and a local file, and its fingerprint (the hub path: test_hub_weights.py)."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from monaserve.adapters import Backbone, BackboneError, Mona, MonaBank, SlotMapping, create_swin, fingerprint_module, inject_mona

from helpers import TINY


def test_random_init_is_reproducible_by_seed():
    a, b, c = (Backbone.load(TINY, "random", seed=s) for s in (5, 5, 6))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == 7 + 64


def test_backbone_is_frozen_and_headless(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    assert tiny_backbone.num_features == 768
    assert tiny_backbone.input_size == (224, 224)
    assert not tiny_backbone.model.training


def test_local_safetensors_and_pth_files_load_the_same_weights(tmp_path, tiny_weights):
    source = safetensors.torch.load_file(tiny_weights)
    pth = tmp_path / "swin.pth"
    torch.save({"state_dict": source}, pth)  # a nested checkpoint, as training scripts write them
    from_safetensors = Backbone.load(TINY, tiny_weights)
    from_pth = Backbone.load(TINY, pth)
    reference = create_swin(TINY, "random", seed=1234)
    assert from_safetensors.fingerprint == from_pth.fingerprint == fingerprint_module(reference)


def test_pth_with_code_is_refused(tmp_path):
    """timm reads local checkpoints with weights_only=True: a pickle that runs code does not load."""
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Exploit(str(marker))}, evil)
    with pytest.raises(Exception, match="(?i)weights.only"):
        Backbone.load(TINY, evil)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="weights file not found"):
        Backbone.load(TINY, tmp_path / "nope.safetensors")


def test_fingerprint_ignores_adapters_device_and_layout_but_not_values():
    model = create_swin(TINY, seed=3)
    before = fingerprint_module(model)
    inject_mona(model, lambda dim: MonaBank(dim, 64, num_slots=2, mapping=SlotMapping(1)))
    assert fingerprint_module(model) == before  # banks are non-persistent buffers
    model.to(memory_format=torch.channels_last)
    assert not model.patch_embed.proj.weight.is_contiguous()
    assert fingerprint_module(model) == before
    with torch.no_grad():
        weight = model.layers[0].blocks[0].norm1.weight
        weight[0] = torch.nextafter(weight[0], torch.tensor(float("inf")))
    assert fingerprint_module(model) != before


def test_fingerprint_of_injected_reference_model_changes_with_adapters():
    """Reference Mona parameters are part of a task model's state dict: only the bare backbone is fingerprinted."""
    model = create_swin(TINY, seed=3)
    before = fingerprint_module(model)
    inject_mona(model, Mona)
    assert fingerprint_module(model) != before
