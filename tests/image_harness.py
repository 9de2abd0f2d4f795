"""Images and containers as tests/test_image.py uses them: a Debian base made with debootstrap (no registry is
reachable here), Python's and nginx's images on it, the monaserve image from the repository's Dockerfile with
this machine's pip configuration passed in, all built with podman once per run and removed after."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

from deploy_harness import ROOT, require_tool

KEEP_IMAGES = os.environ.get("MONASERVE_TEST_KEEP_IMAGES") == "1"
"""Keep the images after the run and reuse the bases next time (for working on these tests); CI removes them."""
DEBIAN_BASE = "localhost/monaserve-test/debian-bookworm-minbase"
PYTHON_BASE = "localhost/monaserve-test/python311-bookworm"
NGINX_IMAGE = "localhost/monaserve-test/nginx-bookworm"
MONASERVE_IMAGE = "localhost/monaserve:cpu"
"""The name deploy/compose.cpu.yaml runs (compose's `monaserve:cpu`, which podman looks up under localhost/)."""
PIP_PATH_SETTINGS = ("find-links", "index-url", "extra-index-url", "constraint", "requirement", "cert", "client-cert")


def require_root() -> None:
    """debootstrap and rootful podman (the configuration .ci/run writes) need root; CI runs as root."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the container tests need root (debootstrap, rootful podman)")
        pytest.skip("the container tests need root (debootstrap, rootful podman)")


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `podman ARGS`, text in and out; a failure raises with podman's own message."""
    done = subprocess.run([require_tool("podman"), *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {shlex.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def pip_settings() -> tuple[str, list[Path]]:
    """This machine's effective pip configuration (its files and PIP_* environment, as `pip config list`
    merges them) as one pip.conf, and the local paths it names, which a build must see at the same places."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    sections: dict[str, dict[str, str]] = {}
    from_environment: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        (from_environment if section == ":env:" else sections.setdefault(section, {}))[key] = value.strip("'\"")
    sections.setdefault("global", {}).update(from_environment)  # PIP_* wins over the files, as in pip
    paths = []
    for section in sections.values():
        for key in PIP_PATH_SETTINGS:
            for item in section.get(key, "").split():
                parsed = urlparse(item)
                if parsed.scheme in ("", "file"):
                    path = Path(parsed.path)
                    local_index = parsed.scheme == "file" and path.name == "simple"  # its files lie beside simple/
                    paths.append(path.parent if local_index else path)
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in items.items()) for name, items in sections.items())
    return text, [path for path in dict.fromkeys(paths) if path.exists()]


@dataclass
class LocalImages:
    """The images a container test runs, built once: `build()` times each and `remove()` deletes them."""

    workdir: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def build(self) -> LocalImages:
        """debootstrap's minimal bookworm, imported; Python and nginx from Debian on it; then the Dockerfile's
        CPU target on the Python base, installing torch from the package index this machine's pip uses."""
        if not (KEEP_IMAGES and self.exists(DEBIAN_BASE)):
            self.timed("debian base", self.make_debian_base)
        for image, containerfile in ((PYTHON_BASE, "python.Containerfile"), (NGINX_IMAGE, "nginx.Containerfile")):
            if not (KEEP_IMAGES and self.exists(image)):
                self.timed(image.rsplit("/", 1)[1], self.build_local, image, containerfile)
        self.timed("monaserve image", self.build_monaserve)
        return self

    def timed(self, what: str, step: Callable[..., None], *args: str) -> None:
        started = time.monotonic()
        step(*args)
        self.seconds[what] = round(time.monotonic() - started, 1)

    @staticmethod
    def exists(image: str) -> bool:
        return podman("image", "exists", image, check=False).returncode == 0

    def make_debian_base(self) -> None:
        root = self.workdir / "bookworm-root"
        done = subprocess.run(
            [require_tool("debootstrap"), "--variant=minbase", "bookworm", str(root)], capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "-", DEBIAN_BASE, stdin=tar.stdout)
        assert tar.wait() == 0
        subprocess.run(["rm", "-rf", str(root)], check=True)

    @staticmethod
    def build_local(image: str, containerfile: str) -> None:
        images = ROOT / "deploy" / "images"
        base = f"DEBIAN_BASE={DEBIAN_BASE}"
        podman("build", "--network", "host", "--build-arg", base, "-t", image, "-f", str(images / containerfile), str(images))

    def build_monaserve(self) -> None:
        """The repository's Dockerfile, TARGET=cpu on the local Python base; torch's index is PyPI's, reached
        (with the local wheel folders and the registry proxy's CA) through this machine's pip settings."""
        text, paths = pip_settings()
        conf = self.workdir / "pip.conf"
        conf.write_text(text)
        mounts = [f"--volume={conf}:/etc/pip.conf:ro", *(f"--volume={path}:{path}:ro" for path in paths)]
        podman(
            "build", "--format", "docker", "--network", "host", *mounts,
            "--build-arg", "TARGET=cpu", "--build-arg", f"CPU_BASE={PYTHON_BASE}", "--build-arg", "CPU_TORCH_INDEX=https://pypi.org/simple",
            "-t", MONASERVE_IMAGE, str(ROOT),
            timeout=1800,
        )  # fmt: skip

    @staticmethod
    def size_bytes(image: str = MONASERVE_IMAGE) -> int:
        return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def remove(self) -> None:
        """The images and the layers the builds left behind (unless MONASERVE_TEST_KEEP_IMAGES=1)."""
        if KEEP_IMAGES:
            return
        podman("rmi", "--force", "--ignore", MONASERVE_IMAGE, NGINX_IMAGE, PYTHON_BASE, DEBIAN_BASE, check=False)
        podman("image", "prune", "--force", check=False)


@dataclass
class Container:
    """One container started by `podman run -d`, addressed by name."""

    name: str

    @classmethod
    @contextmanager
    def run(cls, name: str, *args: str) -> Iterator[Container]:
        """`podman run -d --name NAME ARGS`; the container and its anonymous volumes go on exit."""
        podman("rm", "--force", "--ignore", "--volumes", name, check=False)
        podman("run", "--detach", "--name", name, *args)
        try:
            yield cls(name)
        finally:
            podman("rm", "--force", "--ignore", "--volumes", name, check=False)

    def inspect(self) -> dict:
        return json.loads(podman("container", "inspect", self.name).stdout)[0]

    def address(self) -> str:
        """Its IP address on its (first) network."""
        return next(iter(self.inspect()["NetworkSettings"]["Networks"].values()))["IPAddress"]

    def exec(self, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=check)

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait_healthy(self, timeout: float) -> float:
        """Run the image's own HEALTHCHECK command until it passes; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if podman("healthcheck", "run", self.name, check=False).returncode == 0:
                return time.monotonic() - started
            assert self.inspect()["State"]["Running"], f"{self.name} exited:\n{self.logs()[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not healthy within {timeout} s:\n{self.logs()[-4000:]}")
