"""The first-run demo: three tasks (classify, detect, segment) trained on the shapes data into the store.

The server trains them in its start-up, while it already answers probes: readiness says which task of
the three is training and how long the whole demo should take still, and so does the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monaserve.adapters import Backbone
from monaserve.adapters.data.shapes import write_shapes
from monaserve.adapters.trainer import TrainConfig, train

from .lifecycle import Progress, about
from .store import AdapterStore

log = logging.getLogger(__name__)
LOG_EVERY_S = 15.0
"""How often the demo's overall progress is logged while it trains."""
REPORT_EVERY_S = 0.5
"""How often it is reported to readiness (under `--workers`, a file the front ends read): a probe's pace, not a step's."""


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


class DemoStopped(Exception):
    """The server was told to stop while the demo trained."""


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


class DemoProgress:
    """The demo's progress over all its tasks: reported to readiness every `REPORT_EVERY_S`, logged every
    `LOG_EVERY_S`, and where a stop request ends the training (at a task's start or its next step).

    The time left is the time so far scaled by the steps left over the steps done, so it counts each
    task's evaluation and set-up as the steps before it did."""

    def __init__(
        self,
        tasks: list[str],
        steps: int,
        report: Callable[[Progress], None],
        say: Callable[[str], None],
        stop: threading.Event,
    ) -> None:
        self.tasks, self.steps, self.report, self.say, self.stop = tasks, steps, report, say, stop
        self.started = self.logged = self.reported = time.monotonic()
        self.index = 0

    @property
    def step(self) -> str:
        """Which task of all trains, as readiness says it: "2/3"."""
        return f"{self.index + 1}/{len(self.tasks)}"

    def begin(self, index: int) -> None:
        """Task `index` starts training (unless the server is stopping)."""
        self._stop_if_asked()
        self.index = index
        done = index * self.steps
        self.report(Progress("training demo", self.step, self._eta(done)))
        self.say(f"demo: task {self.step}, {self.tasks[index]}" + (f"; {about(self._eta(done))} left in all" if done else ""))

    def on_step(self, done: int, total: int) -> None:
        """The trainer's step hook: report and log now and then, and stop when asked to."""
        self._stop_if_asked()
        now = time.monotonic()
        if now - self.reported < REPORT_EVERY_S and now - self.logged < LOG_EVERY_S:
            return
        eta = self._eta(self.index * self.steps + done * self.steps / total)
        self.reported = now
        self.report(Progress("training demo", self.step, eta))
        if now - self.logged >= LOG_EVERY_S:
            self.logged = now
            self.say(f"demo: task {self.step}, {self.tasks[self.index]}: step {done}/{total}; {about(eta)} left in all")

    def _stop_if_asked(self) -> None:
        if self.stop.is_set():
            raise DemoStopped("the server is stopping")

    def _eta(self, done_steps: float) -> float | None:
        """Seconds left for every task, at the pace so far; None before a step has run."""
        if done_steps <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return round(elapsed * (len(self.tasks) * self.steps - done_steps) / done_steps, 1)


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
    report: Callable[[Progress], None] = lambda _: None,
    stop: threading.Event | None = None,
    fingerprint: str | None = None,
) -> list[str]:
    """Train the demo tasks the store lacks for this backbone (`fingerprint` of its weights, when the caller
    has them loaded), each as a new version; returns them. `report` hears the overall progress; setting
    `stop` ends the training at its next step with `DemoStopped`."""
    fingerprint = fingerprint or Backbone.load(backbone, weights, seed).fingerprint
    missing = missing_demo_tasks(store, fingerprint)
    if not missing:
        return []
    say(f"demo: training {', '.join(missing)} on synthetic shapes ({steps} steps each at {size} px); this runs once")
    shapes = write_shapes(data_dir, num_images=images, size=size, seed=0)
    tracker = DemoProgress(missing, steps, report, say, stop or threading.Event())
    for index, task in enumerate(missing):
        tracker.begin(index)
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
        train(config, log=say, on_step=tracker.on_step)
        store.write(task, version, config.out.read_bytes())
    say(f"demo: trained {len(missing)} tasks in {time.monotonic() - tracker.started:.0f} s")
    return missing
