"""What every serving process's runtime shares: its state and start-up progress for the health routes and
metrics, the drain, a fatal failure, and where its body budgets count."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from .budgets import LocalTally, Tally
from .config import ServeConfig
from .errors import NotReady
from .metrics import Metrics

State = Literal["loading", "ready", "draining", "failed"]


def about(seconds: float) -> str:
    """A duration as people read it in a log or a 503: 'about 40 s', 'about 3 min'."""
    return f"about {math.ceil(seconds)} s" if seconds < 90 else f"about {math.ceil(seconds / 60)} min"


@dataclass(frozen=True)
class Progress:
    """What a loading server is doing, for its readiness answer, its 503s and its log: the activity, how
    far it is (e.g. "2/3" demo tasks) and the seconds it expects to take still."""

    activity: str
    step: str | None = None
    eta_s: float | None = None

    def __str__(self) -> str:
        done = [part for part in (self.step, None if self.eta_s is None else f"{about(self.eta_s)} left") if part]
        return f"{self.activity} ({', '.join(done)})" if done else self.activity

    def to_json(self) -> dict[str, str | float]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict) -> Progress:
        return cls(str(data["activity"]), data.get("step"), data.get("eta_s"))


class Lifecycle:
    """loading -> ready -> draining, or failed at any point (which ends the process through `on_fatal`)."""

    def __init__(self, config: ServeConfig, on_fatal: Callable[[], None]) -> None:
        self.config = config
        self.on_fatal = on_fatal
        self.metrics = Metrics()
        self.state: State = "loading"
        self.error: str | None = None
        self._progress = Progress("starting")
        self.metrics.replica.labels(config.replica).set(1)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def progress(self) -> Progress:
        """What start-up is doing now (meaningful while loading)."""
        return self._progress

    def report(self, progress: Progress) -> None:
        """Say what start-up does next: readiness answers with it until the process is ready."""
        self._progress = progress

    def new_tally(self) -> Tally:
        """Where a new body budget counts: this process's own."""
        return LocalTally()

    def turn_ready(self) -> None:
        gc.collect()
        gc.freeze()  # what start-up built lives as long as the process: no collection walks it again
        self.state = "ready"
        self.metrics.ready.set(1)

    def fail(self, why: str) -> None:
        """A failure the process cannot serve through: readiness says why, and the process stops."""
        self.state, self.error = "failed", why
        self.metrics.ready.set(0)
        self.on_fatal()

    def begin_drain(self) -> None:
        """Readiness goes false so load balancers stop sending; requests that still arrive are served."""
        if self.state == "ready":
            self.state = "draining"
            self.metrics.ready.set(0)

    def require_ready(self) -> None:
        if self.state == "loading":
            raise NotReady(f"the server is still starting: {self.progress}", retry_after_s=5)
        if self.state not in ("ready", "draining"):
            raise NotReady(f"the server is {self.state}", retry_after_s=1)
