"""The first-run demo trains its three tasks once per backbone, into the store the server reads."""

from __future__ import annotations

import pytest

from monaserve.server.demo import DEMO_TASKS, ensure_demo, missing_demo_tasks
from monaserve.server.store import AdapterStore


def test_demo_trains_once_per_backbone(tmp_path, tiny_weights, shared_backbone):
    store = AdapterStore(tmp_path / "store")
    quick = {"steps": 1, "size": 64, "images": 12, "progress": False, "say": lambda _: None}
    trained = ensure_demo(store, "swin_tiny_patch4_window7_224", str(tiny_weights), 0, tmp_path / "data", **quick)
    assert trained == list(DEMO_TASKS)
    for task, demo in DEMO_TASKS.items():
        manifest = store.manifest(task, 1)
        assert manifest.kind == demo.kind and manifest.backbone.fingerprint == shared_backbone.fingerprint
        assert manifest.training["steps"] == 1
    assert missing_demo_tasks(store, shared_backbone.fingerprint) == []
    assert ensure_demo(store, "swin_tiny_patch4_window7_224", str(tiny_weights), 0, tmp_path / "data", **quick) == []
    # another backbone's weights: the demo trains again, as new versions beside the old ones
    retrained = ensure_demo(store, "swin_tiny_patch4_window7_224", "random", 7, tmp_path / "data", **quick)
    assert retrained == list(DEMO_TASKS) and all(list(store.versions(t)) == [1, 2] for t in DEMO_TASKS)


@pytest.mark.slow
def test_demo_adapters_beat_untrained_ones_on_held_out_data(tmp_path):
    """The slower check: the demo's own training (random backbone, 100 steps each) clearly learns every kind."""
    store = AdapterStore(tmp_path / "store")
    ensure_demo(store, "swin_tiny_patch4_window7_224", "random", 0, tmp_path / "data", progress=False, say=lambda _: None)
    gains = {}
    for task in DEMO_TASKS:
        training = store.manifest(task, 1).training
        before, after = training["untrained_evaluation"], training["evaluation"]
        gains[task] = {metric: after[metric] - before[metric] for metric in after}
    assert gains["shapes-classify"]["top1"] >= 0.08, gains
    assert gains["shapes-detect"]["mAP50"] > 0.005, gains
    assert gains["shapes-segment"]["mIoU"] >= 0.15 and gains["shapes-segment"]["pixel_accuracy"] >= 0.3, gains
