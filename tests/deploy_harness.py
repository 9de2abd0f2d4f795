"""Deployment files as tests use them: the Dockerfile parsed, and nginx run from deploy/nginx/nginx.conf."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

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
