"""Deployment files as tests use them: the Dockerfile parsed, and nginx run from deploy/nginx/nginx.conf."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def require_tool(name: str) -> str:
    """The path of a Debian-packaged tool; skip without it, except in CI where `.ci/run` installs it."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
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


class Nginx:
    """nginx on 127.0.0.1 running deploy/nginx/nginx.conf with its upstream pointed at `ports`."""

    def __init__(self, ports: list[int], workdir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        config = NGINX_CONF.read_text()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=10s;" for p in ports)
        config, replaced = re.subn(r"(?m)^\s*server monaserve-\d:8000 [^\n]*\n(?:\s*server monaserve-\d:8000 [^\n]*\n)*", servers + "\n", config)
        assert replaced == 1, "deploy/nginx/nginx.conf no longer has the upstream block this harness rewrites"
        config, replaced = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", config)
        assert replaced == 1
        temp = "".join(f"    {kind}_temp_path {workdir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = config.replace("http {\n", f"http {{\n    access_log {workdir}/access.log;\n{temp}", 1)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(f"{user}pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n{config}")
        self.binary = require_tool("nginx")

    def test_config(self) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-t", "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")], capture_output=True, text=True)

    def __enter__(self) -> Nginx:
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/health/live", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not start: {(self.workdir / 'error.log').read_text()}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(10)
