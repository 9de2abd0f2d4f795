"""`monaserve info` through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

MONASERVE = str(Path(sys.executable).with_name("monaserve"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MONASERVE, *args], capture_output=True, text=True, timeout=300)


def test_info_prints_backbone_and_per_task_sizes():
    result = run("info", "--backbone", "swin_tiny_patch4_window7_224", "--random-init")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "swin_tiny_patch4_window7_224" in out
    assert "27,519,354" in out
    assert "1,408,128 (5.12% of the backbone)" in out
    assert "1,384,368 (5.03%)" in out
    assert "sha256:" in out


@pytest.mark.parametrize(
    ("backbone", "params", "mona"),
    [("swin_base_patch4_window7_224", 86_743_224, 3_667_456), ("swin_small_patch4_window7_224", 48_837_258, 2_867_328)],
)
def test_info_json(backbone, params, mona):
    result = run("info", "--backbone", backbone, "--random-init", "--json", "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["backbone_parameters"] == params
    assert info["mona_parameters_per_task"] == mona
    assert info["classify_head_parameters"] == 2 * info["widths"][-1] + (info["widths"][-1] + 1) * 10


def test_info_from_a_local_weights_file(tiny_weights):
    result = run("info", "--weights", str(tiny_weights), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["weights"] == str(tiny_weights)


def test_bad_backbone_is_a_clear_error():
    result = run("info", "--backbone", "resnet50", "--random-init")
    assert result.returncode == 2
    assert "unsupported backbone 'resnet50'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_weights_file_is_a_clear_error(tmp_path):
    result = run("info", "--weights", str(tmp_path / "none.pth"))
    assert result.returncode == 2
    assert "weights file not found" in result.stderr
