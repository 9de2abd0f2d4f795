"""Running the app under uvicorn: guarded connections, descriptor limits, a quiet loop log, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from .app import create_app
from .config import REPLICA_HEADER, ServeConfig
from .http_protocol import PROTOCOLS, ConnectionRules
from .runtime import AnyRuntime, Runtime

log = logging.getLogger(__name__)
RESERVED_DESCRIPTORS = 128
"""Descriptors kept back from connections for the process's own files, pools and store."""


class QuietLoopErrors:
    """The event loop's exception handler, rate-limited: each kind of error is logged in full the first
    time, then at most once per `interval_s` with a count of the ones left out.

    (At its descriptor limit, asyncio logs a traceback for every failed accept, thousands a second.)
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        kind = f"{context.get('message')}: {type(exc).__name__}" if exc is not None else str(context.get("message"))
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        suppressed = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        if last is None:
            loop.default_exception_handler(context)
        else:
            log.error("%s: %s (%d more in the last %.0f s)", kind, exc, suppressed, now - last)


PROBES = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})


class LeaveOutProbes(logging.Filter):
    """Drops access-log lines of health probes (a load balancer's every few seconds would drown the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 3 and str(args[2]).split("?", 1)[0] in PROBES)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT readiness goes false at once; uvicorn stops after `drain_delay_s` (so load
    balancers notice first) and finishes in-flight requests, and the process exits 0. A second signal
    exits at once. (uvicorn's own handler would re-raise the signal after the drain.)"""

    def __init__(self, config: uvicorn.Config, runtime: AnyRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._draining = False

    async def serve(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(QuietLoopErrors())
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        self.runtime.begin_drain()
        timer = threading.Timer(self.runtime.config.drain_delay_s, setattr, (self, "should_exit", True))
        timer.daemon = True
        timer.start()


def descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit, as nginx's worker_rlimit_nofile does; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_rules(config: ServeConfig) -> ConnectionRules:
    """The connection guards for `config`, with the caps kept below the descriptor limit."""
    hard_cap = max(1, descriptor_limit() - RESERVED_DESCRIPTORS)
    cap = min(config.max_connections, hard_cap - hard_cap // 4)  # room to answer 503 before closing at once
    if cap < config.max_connections:
        log.warning(
            "--max-connections %d lowered to %d: the process may open %d files",
            config.max_connections,
            cap,
            hard_cap + RESERVED_DESCRIPTORS,
        )
    return ConnectionRules(
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
        keep_alive_s=config.keep_alive_s,
        max_connections=cap,
        hard_max_connections=hard_cap,
        headers=((REPLICA_HEADER.lower(), config.replica),),
    )


RuntimeFactory = Callable[[Callable[[], None]], AnyRuntime]
"""Makes a process's runtime, given what to call when it fails for good."""


def run(
    config: ServeConfig, make_runtime: RuntimeFactory | None = None, sockets: list[socket.socket] | None = None, uds: str | None = None
) -> int:
    """Serve until signalled; 0 after a clean drain, 1 if start-up failed. By default the app is this
    process's `Runtime` on `config`'s host and port; under `--workers` a process gives its own runtime
    and its listening `sockets` (a front end) or a private `uds` path (the engine process)."""
    server: DrainingServer | None = None

    def stop_after_failure() -> None:
        server.should_exit = True

    runtime = (make_runtime or functools.partial(Runtime, config))(stop_after_failure)
    where = {"uds": uds} if uds is not None else {"host": config.host, "port": config.port}
    server = DrainingServer(
        uvicorn.Config(
            create_app(runtime, serve_grpc=uds is None),  # the engine process under --workers serves only its private socket
            **where,
            log_level=config.log_level,
            access_log=config.access_log,
            headers=[(REPLICA_HEADER, config.replica)],  # on every answer the app makes, and httptools' own 400s
            server_header=False,
            http=functools.partial(PROTOCOLS[config.http], rules=connection_rules(config)),
            timeout_keep_alive=config.keep_alive_s,  # uvicorn's own timer; the protocol's is the same
            timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
        ),
        runtime,
    )
    if config.access_log and not config.access_log_probes:  # after uvicorn.Config, which configures its loggers
        logging.getLogger("uvicorn.access").addFilter(LeaveOutProbes())
    server.run(sockets=sockets)
    return 1 if runtime.state == "failed" else 0
