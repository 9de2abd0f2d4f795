"""The first-run demo: three tasks (classify, detect, segment) trained on the shapes data into the store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monaserve.adapters import Backbone
from monaserve.adapters.data.shapes import write_shapes
from monaserve.adapters.trainer import TrainConfig, train

from .store import AdapterStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoTask:
    """One demo task: its kind, where its data lies in the shapes folder, and its learning rate."""

    kind: str
    data: str
    masks: str | None = None
    lr: float = 5e-3


DEMO_TASKS = {
    "shapes-classify": DemoTask("classify", "classify"),
    "shapes-detect": DemoTask("detect", "detect/annotations.json", lr=1e-3),
    "shapes-segment": DemoTask("segment", "segment/images", masks="segment/masks"),
}


def missing_demo_tasks(store: AdapterStore, fingerprint: str) -> list[str]:
    """Demo tasks with no stored version trained on the backbone with `fingerprint`."""
    missing = []
    for task in DEMO_TASKS:
        fingerprints = set()
        for version in store.versions(task):
            try:
                fingerprints.add(store.manifest(task, version).backbone.fingerprint)
            except Exception as exc:  # a broken file does not count as the demo
                log.warning("demo: ignoring %s v%s: %s", task, version, exc)
        if fingerprint not in fingerprints:
            missing.append(task)
    return missing


def ensure_demo(
    store: AdapterStore,
    backbone: str,
    weights: str,
    seed: int,
    data_dir: Path,
    steps: int = 100,
    size: int = 64,
    images: int = 240,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Train the demo tasks the store lacks for this backbone, each as a new version; returns them."""
    fingerprint = Backbone.load(backbone, weights, seed).fingerprint
    missing = missing_demo_tasks(store, fingerprint)
    if not missing:
        return []
    say(f"demo: training {', '.join(missing)} on synthetic shapes ({steps} steps each at {size} px); this runs once")
    shapes = write_shapes(data_dir, num_images=images, size=size, seed=0)
    for task in missing:
        demo = DEMO_TASKS[task]
        version = max(store.versions(task), default=0) + 1
        config = TrainConfig(
            kind=demo.kind,
            data=shapes / demo.data,
            masks=demo.masks and shapes / demo.masks,
            name=task,
            version=version,
            backbone=backbone,
            weights=weights,
            seed=seed,
            input_size=size,
            head_channels=64,
            epochs=1000,
            max_steps=steps,
            batch_size=8,
            lr=demo.lr,
            warmup_steps=10,
            workers=0,
            progress=progress,
            out=data_dir / f"{task}-{version}.safetensors",
        )
        train(config, log=say)
        store.write(task, version, config.out.read_bytes())
    return missing
