"""nginx in front of `monaserve serve` processes, as the deployment runs it, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from .processes import free_port


def find_tool(name: str) -> str | None:
    """The path of a system tool (Debian puts some in /usr/sbin, outside a user's PATH), or None."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


class Nginx:
    """nginx on 127.0.0.1 on `port` (HTTP) and `grpc_port`, running `config` (the shape of
    deploy/nginx/nginx.conf) with its upstreams pointed at `ports` and `grpc_ports` on 127.0.0.1 (by
    default free ports where nothing listens); `binary` is nginx's path (see `find_tool`)."""

    def __init__(
        self,
        ports: list[int],
        workdir: Path,
        port: int,
        config: Path,
        binary: str,
        grpc_ports: list[int] | None = None,
        grpc_port: int | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_target = f"127.0.0.1:{grpc_port or free_port()}"
        self.workdir = workdir
        source = config
        config = source.read_text()
        for upstream, listen, replicas, where in (
            (8000, "listen 8080;", ports, f"listen 127.0.0.1:{port};"),
            (8001, "listen 8081 http2;", grpc_ports or [free_port() for _ in ports], f"listen {self.grpc_target} http2;"),
        ):
            servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=10s;" for p in replicas)
            line = rf"\s*server monaserve-\d:{upstream} [^\n]*\n"
            config, replaced = re.subn(rf"(?m)^{line}(?:{line})*", servers + "\n", config)
            if replaced != 1:
                raise ValueError(f"{source} has no upstream block of `server monaserve-N:{upstream}` lines to rewrite")
            config, replaced = re.subn(re.escape(listen), where, config)
            if replaced != 1:
                raise ValueError(f"{source} has no `{listen}` to rewrite")
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
