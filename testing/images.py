"""Images and containers made with podman, for tests/test_image.py and bench/image_build_bench.py: a Debian
base from debootstrap (where no registry is reachable), Debian's Python and nginx on it, the monaserve image
from a Dockerfile with this machine's pip configuration passed in, and containers run from them."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .nginx import find_tool

ROOT = Path(__file__).resolve().parents[1]
"""The repository (a source checkout: the Dockerfile and deploy/ lie beside this package)."""
KEEP_IMAGES = os.environ.get("MONASERVE_TEST_KEEP_IMAGES") == "1"
"""Keep the images after the run and reuse the bases next time (for working on these tests); CI removes them."""
DEBIAN_BASE = "localhost/monaserve-test/debian-bookworm-minbase"
PYTHON_BASE = "localhost/monaserve-test/python311-bookworm"
NGINX_IMAGE = "localhost/monaserve-test/nginx-bookworm"
MONASERVE_IMAGE = "localhost/monaserve:cpu"
"""The name deploy/compose.cpu.yaml runs (compose's `monaserve:cpu`, which podman looks up under localhost/)."""
PIP_PATH_SETTINGS = ("find-links", "index-url", "extra-index-url", "constraint", "requirement", "cert", "client-cert")


def niced(niceness: int) -> list[str]:
    """The prefix that runs a command at `niceness` (none at 0)."""
    return ["nice", "-n", str(niceness)] if niceness else []


def tool(name: str) -> str:
    """The path of a Debian-packaged tool these images need."""
    path = find_tool(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install {name})")
    return path


def cannot_build() -> str | None:
    """Why these images cannot be built here (rootful podman and debootstrap need root and the tools), or None."""
    if os.geteuid() != 0:
        return "building the images needs root (debootstrap, rootful podman)"
    missing = [name for name in ("podman", "buildah", "debootstrap") if find_tool(name) is None]
    return f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})" if missing else None


def podman(*args: str, check: bool = True, timeout: float = 600, niceness: int = 0, **kwargs) -> subprocess.CompletedProcess:
    """Run `podman ARGS` (at `niceness`), text in and out; a failure raises with podman's own message."""
    command = [*niced(niceness), tool("podman"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {shlex.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
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
    """The bases and images a container test runs, each build timed into `seconds`; `remove()` deletes them.
    With `keep` (MONASERVE_TEST_KEEP_IMAGES=1), bases already built are reused and nothing is removed. Builds
    run at `niceness`, so that a build beside other work takes the CPU that work leaves."""

    workdir: Path
    keep: bool = KEEP_IMAGES
    niceness: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)

    def build(self) -> LocalImages:
        """The bases, then the repository's Dockerfile on them as `MONASERVE_IMAGE`."""
        self.build_bases()
        self.build_monaserve()
        return self

    def build_bases(self) -> None:
        """debootstrap's minimal bookworm, imported; Debian's Python and nginx on it (deploy/images/)."""
        if not (self.keep and self.exists(DEBIAN_BASE)):
            self.timed("debian base", self.make_debian_base)
        for image, containerfile in ((PYTHON_BASE, "python.Containerfile"), (NGINX_IMAGE, "nginx.Containerfile")):
            if not (self.keep and self.exists(image)):
                self.timed(image.rsplit("/", 1)[1], self.build_local, image, containerfile)
        self.built += [DEBIAN_BASE, PYTHON_BASE, NGINX_IMAGE]

    def timed(self, what: str, step: Callable[..., object], *args: object, **kwargs: object) -> None:
        started = time.monotonic()
        step(*args, **kwargs)
        self.seconds[what] = round(time.monotonic() - started, 1)

    @staticmethod
    def exists(image: str) -> bool:
        return podman("image", "exists", image, check=False).returncode == 0

    def make_debian_base(self) -> None:
        root = self.workdir / "bookworm-root"
        command = [*niced(self.niceness), tool("debootstrap"), "--variant=minbase", "bookworm", str(root)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "-", DEBIAN_BASE, stdin=tar.stdout, niceness=self.niceness)
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {root} failed")
        subprocess.run(["rm", "-rf", str(root)], check=True)

    def build_local(self, image: str, containerfile: str) -> None:
        images, base = ROOT / "deploy" / "images", f"DEBIAN_BASE={DEBIAN_BASE}"
        build = ["build", "--network", "host", "--build-arg", base, "-t", image, "-f", str(images / containerfile), str(images)]
        podman(*build, niceness=self.niceness)

    def build_monaserve(self, dockerfile: Path = ROOT / "Dockerfile", tag: str = MONASERVE_IMAGE, *, no_cache: bool = False) -> None:
        """`dockerfile` (the repository's by default) with TARGET=cpu on the local Python base, from the
        repository as context; torch's index is PyPI's, reached (with the local wheel folders and the registry
        proxy's CA) through this machine's pip settings. Timed as `tag`."""
        text, paths = pip_settings()
        conf = self.workdir / "pip.conf"
        conf.write_text(text)
        mounts = [f"--volume={conf}:/etc/pip.conf:ro", *(f"--volume={path}:{path}:ro" for path in paths)]
        self.timed(tag, podman,
            "build", "--format", "docker", "--network", "host", *mounts, *(["--no-cache"] if no_cache else []),
            "--build-arg", "TARGET=cpu", "--build-arg", f"CPU_BASE={PYTHON_BASE}", "--build-arg", "CPU_TORCH_INDEX=https://pypi.org/simple",
            "-t", tag, "-f", str(dockerfile), str(ROOT), timeout=1800, niceness=self.niceness,
        )  # fmt: skip
        self.built.append(tag)

    @staticmethod
    def size_bytes(image: str = MONASERVE_IMAGE) -> int:
        return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def remove(self) -> None:
        """The images built and the layers the builds left behind (unless `keep`)."""
        if self.keep or not self.built:
            return
        podman("rmi", "--force", "--ignore", *reversed(self.built), check=False)
        podman("image", "prune", "--force", check=False)
        self.built.clear()


class BackgroundBuild:
    """`LocalImages.build()` in a thread of its own, started early so that minutes of building overlap other
    work: `result()` waits for it (and raises what it raised); `remove()` waits, then removes the images."""

    def __init__(self, images: LocalImages) -> None:
        self.images = images
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, name="image-build", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        try:
            self.images.build()
        except BaseException as error:  # handed to whoever waits on the result
            self._error = error

    def result(self) -> LocalImages:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.images

    def remove(self) -> None:
        self._thread.join()
        self.images.remove()
        shutil.rmtree(self.images.workdir, ignore_errors=True)


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
            if not self.inspect()["State"]["Running"]:
                raise RuntimeError(f"{self.name} exited:\n{self.logs()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy within {timeout} s:\n{self.logs()[-4000:]}")
