"""`--weights hub`: which pretrained weights load, from the Hugging Face cache, and one line with the fix when they cannot."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from monaserve.adapters import swin
from monaserve.adapters.swin import OFFLINE_FIX, SUPPORTED_BACKBONES, BackboneError, HubWeights, describe_weights

from helpers import TINY

LOAD = """
import sys
import time

import safetensors.torch

from monaserve.adapters import Backbone

started = time.monotonic()
try:
    backbone = Backbone.load(sys.argv[1], "hub")
except ValueError as exc:
    outcome = f"ValueError: {exc}"
else:
    safetensors.torch.save_file(backbone.model.state_dict(), sys.argv[2])
    outcome = backbone.weights
print(f"{time.monotonic() - started:.1f}")
print(outcome)
"""
"""Load a backbone's hub weights, saving those loaded; print the seconds it took, then the ValueError or which weights."""


@pytest.mark.parametrize("arch", SUPPORTED_BACKBONES)
def test_an_untagged_backbone_loads_timms_imagenet_22k_weights(arch):
    assert HubWeights.of(arch) == HubWeights(model=f"{arch}.ms_in22k", hf_hub_id=f"timm/{arch}.ms_in22k", filename="model.safetensors")


@pytest.mark.parametrize("tag", ["ms_in1k", "ms_in22k_ft_in1k"])
def test_a_tag_in_the_backbone_name_is_kept(tag):
    assert HubWeights.of(f"{TINY}.{tag}").hf_hub_id == f"timm/{TINY}.{tag}"


def test_without_a_preferred_tag_timms_default_loads(monkeypatch):
    monkeypatch.setattr(swin, "PREFERRED_TAGS", ("in99k",))
    assert HubWeights.of(TINY).model == f"{TINY}.ms_in1k"
    assert HubWeights.of("swin_large_patch4_window7_224").model == "swin_large_patch4_window7_224.ms_in22k_ft_in1k"


def test_a_tag_timm_lacks_is_refused_naming_those_it_has():
    with pytest.raises(BackboneError, match=rf"no pretrained weights '{TINY}.in21k'; .*{TINY}.ms_in22k\b"):
        HubWeights.of(f"{TINY}.in21k")


def test_the_weights_are_described_exactly(tiny_weights):
    assert describe_weights(TINY, "hub", 0) == f"{TINY}.ms_in22k (Hugging Face timm/{TINY}.ms_in22k, model.safetensors)"
    assert describe_weights(TINY, "random", 7) == "random (seed 7)"
    assert describe_weights(TINY, tiny_weights, 0) == str(tiny_weights)


@pytest.fixture
def closed_hub() -> Iterator[str]:
    """A hub endpoint that refuses connections: a local port this test holds bound and never listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def load_from_hub(home: Path, endpoint: str, offline: bool) -> subprocess.CompletedProcess:
    """Run `LOAD` on Swin-T in a process of its own, since huggingface_hub reads its environment at import: the Hugging
    Face home and cache under `home`, the hub at `endpoint`, HF_HUB_OFFLINE as told; the weights go to `home`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": str(int(offline))}
    command = [sys.executable, "-c", LOAD, TINY, str(home / "loaded.safetensors")]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.process
@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "offline"])
def test_weights_neither_cached_nor_reachable_fail_at_once_in_one_line_with_the_fix(tmp_path, closed_hub, offline):
    result = load_from_hub(tmp_path, closed_hub, offline)
    assert result.returncode == 0, result.stderr
    seconds, line = result.stdout.splitlines()
    assert float(seconds) < 15  # huggingface_hub alone retries an unreachable hub for about a minute
    assert line.startswith(f"ValueError: --weights hub: {TINY}.ms_in22k (Hugging Face timm/{TINY}.ms_in22k, model.safetensors) ")
    assert f"is not in the Hugging Face cache at {tmp_path / 'hub'}, and " in line
    assert ("HF_HUB_OFFLINE keeps the hub out" if offline else f"the hub at {closed_hub} is unreachable (ConnectError: ") in line
    assert line.endswith("; start with --random-init (random weights, offline) or --weights FILE (a local .safetensors/.pth)")
    assert OFFLINE_FIX in line


def put_in_hub_cache(cache: Path, weights: HubWeights, source: Path) -> None:
    """Lay out a Hugging Face hub cache holding `source` as `weights`' file at the repository's main."""
    repo = cache / ("models--" + weights.hf_hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / weights.filename).write_bytes(source.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.process
@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "offline"])
def test_hub_weights_load_from_the_hugging_face_cache(tmp_path, closed_hub, tiny_weights, offline):
    """The real `weights="hub"` path reads the cache first: offline, or with the hub unreachable, the cached file loads."""
    weights = HubWeights.of(TINY)
    put_in_hub_cache(tmp_path / "hub", weights, tiny_weights)
    result = load_from_hub(tmp_path, closed_hub, offline)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [str(weights)]
    expected, loaded = (safetensors.torch.load_file(path) for path in (tiny_weights, tmp_path / "loaded.safetensors"))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
