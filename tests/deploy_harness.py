"""Deployment files as tests use them: the Dockerfile parsed, nginx run from deploy/nginx/nginx.conf, and the
client load that topology tests keep up while they take replicas away."""

from __future__ import annotations

import os
import re
import shlex
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from monaserve import testing

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def require_tool(name: str) -> str:
    """The path of a Debian-packaged tool; skip without it, except in CI where `.ci/run` installs it."""
    path = testing.find_tool(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing; .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> tuple[list[tuple[str, str]], list[Stage]]:
    """Global instructions (before the first FROM) and stages, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    preamble, stages = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(name=parts[2] if len(parts) > 2 else "", base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            preamble.append((keyword, args))
    return preamble, stages


def parse_env(args: str) -> dict[str, str]:
    """`ENV A=1 B=2` (the key=value form) as a dict."""
    return dict(item.split("=", 1) for item in shlex.split(args))


def Nginx(ports: list[int], workdir: Path, port: int, grpc_ports: list[int] | None = None) -> testing.Nginx:  # noqa: N802 (reads as the class it makes)
    """nginx running deploy/nginx/nginx.conf in `workdir` on `port`, its upstreams pointed at `ports` (and `grpc_ports`)."""
    return testing.Nginx(ports, workdir, port, config=NGINX_CONF, binary=require_tool("nginx"), grpc_ports=grpc_ports)


REPLICA_HEADER = "x-monaserve-replica"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `predicate` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


class RequestLoops:
    """`clients` threads classifying `image` round `tasks` through `url` until the block ends, counting each
    status and, of the answers, which replica gave them: a topology test asserts nothing was lost."""

    def __init__(self, url: str, tasks: list[str], image: bytes, clients: int = 4) -> None:
        self.url, self.tasks, self.image = url, tasks, image
        self.statuses: Counter[int] = Counter()
        self.served_by: Counter[str] = Counter()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(k,)) for k in range(clients)]

    @property
    def sent(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        with self._lock:
            return sum(n for code, n in self.statuses.items() if code != 200)

    def _loop(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = offset
            while not self._stop.is_set():
                task = self.tasks[i % len(self.tasks)]
                response = client.post(f"/v1/tasks/{task}/classify", content=self.image, headers={"content-type": "image/jpeg"})
                i += 1
                with self._lock:
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        self.served_by[response.headers[REPLICA_HEADER]] += 1

    def __enter__(self) -> RequestLoops:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
