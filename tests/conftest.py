"""Shared fixtures: randomly initialised backbones saved to real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch

from helpers import TINY
from monaserve.adapters import Backbone, create_swin


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Swin-T saved as safetensors: the offline stand-in for downloaded weights."""
    path = tmp_path_factory.mktemp("weights") / f"{TINY}.safetensors"
    safetensors.torch.save_file(create_swin(TINY, "random", seed=1234).state_dict(), path)
    return path


@pytest.fixture
def tiny_backbone(tiny_weights: Path) -> Backbone:
    """A fresh Backbone from `tiny_weights` (each test may inject into its own)."""
    return Backbone.load(TINY, tiny_weights)


@pytest.fixture(scope="session")
def shared_backbone(tiny_weights: Path) -> Backbone:
    """A read-only Backbone from `tiny_weights`, for making manifests and packages (never inject into it)."""
    return Backbone.load(TINY, tiny_weights)
