"""nginx in front of `monaserve serve` processes, as the deployment runs it, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx


def find_tool(name: str) -> str | None:
    """The path of a system tool (Debian puts some in /usr/sbin, outside a user's PATH), or None."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


class Nginx:
    """nginx on 127.0.0.1 on `port`, running `config` (the shape of deploy/nginx/nginx.conf) with its
    upstream pointed at `ports` on 127.0.0.1; `binary` is nginx's path (see `find_tool`)."""

    def __init__(self, ports: list[int], workdir: Path, port: int, config: Path, binary: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        source = config
        config = source.read_text()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=10s;" for p in ports)
        config, replaced = re.subn(
            r"(?m)^\s*server monaserve-\d:8000 [^\n]*\n(?:\s*server monaserve-\d:8000 [^\n]*\n)*", servers + "\n", config
        )
        if replaced != 1:
            raise ValueError(f"{source} has no upstream block of `server monaserve-N:8000` lines to rewrite")
        config, replaced = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", config)
        if replaced != 1:
            raise ValueError(f"{source} has no `listen 8080;` to rewrite")
        temp = "".join(f"    {kind}_temp_path {workdir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = config.replace("http {\n", f"http {{\n    access_log {workdir}/access.log;\n{temp}", 1)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(f"{user}pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n{config}")
        self.binary = binary

    def test_config(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binary, "-t", "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")], capture_output=True, text=True
        )

    def __enter__(self) -> Nginx:
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
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
