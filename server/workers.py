"""`--workers N`: one engine process and N front-end processes on one port, started and watched by a
supervisor (the `monaserve serve` process itself).

    supervisor         starts the children, restarts front ends, drains in order
      engine process   the backbone, adapter slots and batches (`Runtime` + `EngineService`), and the
                       admin API on a private Unix socket
      front end 1..N   HTTP on the shared port (SO_REUSEPORT: the kernel spreads connections), decode,
                       prepare, post-process (`FrontEndRuntime`); images to the engine in shared memory

What the processes share lives in a private folder (`run_dir.RunDir`). Front ends answer liveness at
once and turn ready when the engine is. A front end that dies is started again (a few times a minute at
most); the engine dying stops the server with exit 1, for the orchestrator to restart it whole. SIGTERM
drains the front ends (readiness false, in-flight requests finish), then the engine. The children die
with the supervisor (Linux's parent-death signal), as a container's processes die together.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .config import ServeConfig
from .run_dir import RunDir, secrets_environment

log = logging.getLogger(__name__)
RESTARTS_PER_MINUTE = 5
"""A front end that dies more often than this is not restarted again: the server stops with exit 1."""
POLL_S = 0.1
LISTEN_BACKLOG = 2048
PR_SET_PDEATHSIG = 1


def process_name(role: str, index: int) -> str:
    """How logs name a child: 'engine', or 'front end 1'..'front end N'."""
    return role if role == "engine" else f"front end {index + 1}"


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_ports_free(config: ServeConfig) -> None:
    """Fail at once, in one line, if another process holds the HTTP or the gRPC port: before a demo trains
    or a backbone loads, and before front ends bind both with SO_REUSEPORT, which would share them with it."""
    for port, flag in ((config.port, "--port"), (config.grpc_port, "--grpc-port")):
        if port == 0:
            continue
        with socket.socket(address_family(config.host)) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, port))
            except OSError as exc:
                raise ValueError(f"cannot listen on {config.host}:{port}: {exc.strerror}; give another {flag}") from None


def parent_death_signal() -> Callable[[], None] | None:
    """What a child runs between fork and exec to be killed when the supervisor dies: Linux's prctl,
    looked up here in the supervisor, so the child only calls it (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # this process's own libc: no library search
    return functools.partial(prctl, PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """One child process of the server: its role, its command and its process."""

    def __init__(self, role: str, run: RunDir, env: dict[str, str], index: int = 0) -> None:
        self.role, self.index, self.name = role, index, process_name(role, index)
        self.command = [sys.executable, "-m", "monaserve.server.workers", role, str(run.path), str(index), str(os.getpid())]
        self.env = env
        self.process: subprocess.Popen | None = None
        self._die_with_parent = parent_death_signal()

    def start(self) -> None:
        # its own session: a terminal's Ctrl-C reaches the supervisor only, which stops the children in order
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True, preexec_fn=self._die_with_parent)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, deadline: float) -> int:
        """The exit code, killing the process if it has not exited by `deadline` (monotonic)."""
        try:
            return self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("%s did not stop in time; killing it", self.name)
            self.process.kill()
            return self.process.wait()


class Supervisor:
    """Starts the engine and the front ends, restarts front ends, and stops them all in order."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config = dataclasses.replace(config, workers=config.front_ends)  # every child counts the same front ends
        self.run_dir = RunDir.make(config)
        env = {**os.environ, **secrets_environment(config), "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir.metrics)}
        self.engine = Child("engine", self.run_dir, env)
        self.front_ends = [Child("front-end", self.run_dir, env, index) for index in range(config.front_ends)]
        self.stopping = False
        self._restarts: deque[float] = deque()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        config = self.config
        log.info("serving on %s:%d: one engine process and %d front-end processes", config.host, config.port, len(self.front_ends))
        try:
            self.engine.start()
            for child in self.front_ends:
                child.start()
            code = self._watch()
            return self._stop() or code
        finally:
            shutil.rmtree(self.run_dir.path, ignore_errors=True)

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.stopping:  # a second signal: every child stops at once (their own second-signal rule)
            for child in (*self.front_ends, self.engine):
                child.signal(signal.SIGTERM)
        self.stopping = True

    def _watch(self) -> int:
        """Until a signal (0) or the engine's death (1): restart front ends that die."""
        while not self.stopping:
            time.sleep(POLL_S)
            if self.engine.process.poll() is not None:
                log.error("the engine process exited (code %s); stopping the server", self.engine.process.returncode)
                self._forget(self.engine)
                return 1
            for child in self.front_ends:
                if child.process.poll() is not None and not self.stopping:
                    self._forget(child)
                    if not self._may_restart():
                        log.error("%s exited (code %s), too often to restart; stopping the server", child.name, child.process.returncode)
                        return 1
                    log.error("%s exited (code %s); starting it again", child.name, child.process.returncode)
                    child.start()
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > 60:
            self._restarts.popleft()
        self._restarts.append(now)
        return len(self._restarts) <= RESTARTS_PER_MINUTE

    def _forget(self, child: Child) -> None:
        """A child's live gauges leave the metrics with it (its counters stay: totals never go back)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.process.pid, str(self.run_dir.metrics))

    def _stop(self) -> int:
        """Front ends first (they drain and finish what is in flight), then the engine; 1 if any failed to stop cleanly."""
        config = self.config
        for child in self.front_ends:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + config.drain_delay_s + config.request_timeout_s + 10
        codes = [child.wait(deadline) for child in self.front_ends]
        self.engine.signal(signal.SIGTERM)
        codes.append(self.engine.wait(time.monotonic() + config.request_timeout_s + 10))
        return 0 if all(code == 0 for code in codes) else 1


def serve_workers(config: ServeConfig) -> int:
    """`monaserve serve` with `config.front_ends` > 1 (`cmd_serve` has checked the ports)."""
    return Supervisor(config).run()


# ---- in the children -----------------------------------------------------------------------------


def listening_socket(config: ServeConfig) -> socket.socket:
    """This front end's own socket on the shared port: the kernel spreads new connections over the front ends."""
    return socket.create_server((config.host, config.port), family=address_family(config.host), backlog=LISTEN_BACKLOG, reuse_port=True)


def run_engine(config: ServeConfig, run: RunDir) -> int:
    from .http_server import run as serve
    from .remote_engine import EngineService
    from .runtime import Runtime

    service = EngineService(run.engine_socket)
    # the front ends drain before the engine is told to stop, and answer browsers' CORS themselves
    own = dataclasses.replace(config, drain_delay_s=0.0, cors_origins="")
    return serve(own, lambda on_fatal: Runtime(own, on_fatal, peers=service, publish=run.write_progress), uds=run.admin_socket)


def run_front_end(config: ServeConfig, run: RunDir, index: int) -> int:
    import torch

    from .front_end import FrontEndRuntime
    from .http_server import run as serve

    torch.set_num_threads(1)  # its decode threads are its parallelism; torch's own pool would fight them for the cores

    return serve(config, lambda on_fatal: FrontEndRuntime(config, run, index, on_fatal), sockets=[listening_socket(config)])


def main(argv: list[str]) -> int:
    role, path, index, supervisor = argv
    if os.getppid() != int(supervisor):  # it died before this process could ask to die with it
        return 1
    run = RunDir(Path(path))
    config = run.read_config()
    logging.basicConfig(
        level=config.log_level.upper(), format=f"%(asctime)s %(levelname)s [{process_name(role, int(index))}] %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded admin call: the access log has it
    if role == "engine":
        return run_engine(config, run)
    return run_front_end(config, run, int(index))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
