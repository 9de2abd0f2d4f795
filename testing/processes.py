"""Running a real `monaserve serve` as a process, for integration tests and benchmarks (here and in your own)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MONASERVE = str(Path(sys.executable).with_name("monaserve"))
TOKEN = "test-admin-token"
"""The admin token `ServerProcess.client` sends unless told otherwise."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `monaserve serve` with `args`, waits for readiness, and stops it (SIGTERM) on exit.

    `launcher` is a command that runs the server as its last arguments and `exec`s it (so the process
    is the server): a mount namespace, say. `cwd` is its working directory (relative paths start there).
    """

    def __init__(
        self,
        weights: Path,
        store: Path | str,
        *args: str,
        env: dict[str, str] | None = None,
        log: Path,
        port: int | None = None,
        launcher: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"MONASERVE_GRPC_PORT": str(free_port()), **(env or {})}  # an environment variable: older code (a baseline) ignores it
        self.grpc_port = int(env["MONASERVE_GRPC_PORT"])
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.store = store
        self.log_path = log
        command = [MONASERVE, "serve", "--weights", str(weights), "--store", str(store), "--port", str(self.port), *args]
        command = [*(launcher or []), *command]
        self._log = log.open("ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=cwd)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def watch_start(self, timeout: float = 300.0, every_s: float = 0.5) -> list[dict]:
        """Wait for readiness as an orchestrator's probes would (every `every_s`): from the first connection on,
        liveness must answer 200 and readiness 503 until it answers 200; returns the 503 bodies, in order."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                live, ready = httpx.get(self.url + "/health/live", timeout=2), httpx.get(self.url + "/health/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if live.status_code != 200 or ready.status_code not in (200, 503):
                raise AssertionError(f"live {live.status_code}, ready {ready.status_code} {ready.text} while starting")
            if ready.status_code == 200:
                return seen
            seen.append(ready.json())
            time.sleep(every_s)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server process's resident memory now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.process.pid}")

    def client(self, token: str | None = TOKEN, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def image_bytes(seed: int, size: tuple[int, int] = (160, 120), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A random-noise image of `size` (width, height) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
