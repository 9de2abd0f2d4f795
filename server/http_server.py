"""Running the app under uvicorn, with a drain on SIGTERM."""

from __future__ import annotations

import threading

import uvicorn

from .api import create_app
from .runtime import Runtime, ServeConfig


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT readiness goes false at once; uvicorn stops after `drain_delay_s` (so load
    balancers notice first) and finishes in-flight requests, and the process exits 0. A second signal
    exits at once. (uvicorn's own handler would re-raise the signal after the drain.)"""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        self.runtime.begin_drain()
        timer = threading.Timer(self.runtime.config.drain_delay_s, setattr, (self, "should_exit", True))
        timer.daemon = True
        timer.start()


def run(config: ServeConfig, host: str, port: int, log_level: str = "info") -> int:
    """Serve until signalled; 0 after a clean drain, 1 if start-up failed."""
    server: DrainingServer | None = None

    def stop_after_failure() -> None:
        server.should_exit = True

    runtime = Runtime(config, on_fatal=stop_after_failure)
    server = DrainingServer(
        uvicorn.Config(
            create_app(runtime),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
        ),
        runtime,
    )
    server.run()
    return 1 if runtime.state == "failed" else 0
