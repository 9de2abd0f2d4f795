"""What every serving process's runtime shares: its state for the health routes and metrics, the drain,
a fatal failure, and where its body budgets count."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Literal

from .budgets import LocalTally, Tally
from .config import ServeConfig
from .errors import NotReady
from .metrics import Metrics

State = Literal["loading", "ready", "draining", "failed"]


class Lifecycle:
    """loading -> ready -> draining, or failed at any point (which ends the process through `on_fatal`)."""

    def __init__(self, config: ServeConfig, on_fatal: Callable[[], None]) -> None:
        self.config = config
        self.on_fatal = on_fatal
        self.metrics = Metrics()
        self.state: State = "loading"
        self.error: str | None = None
        self.metrics.replica.labels(config.replica).set(1)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

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
            raise NotReady("the server is still loading its backbone", retry_after_s=5)
        if self.state not in ("ready", "draining"):
            raise NotReady(f"the server is {self.state}", retry_after_s=1)
