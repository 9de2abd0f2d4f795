"""Shared fixtures: randomly initialised backbones saved to real files, and servers run both ways."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

if not Path("/dev/nvidiactl").exists():  # before torch imports Triton: its kernels run on the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import safetensors.torch  # noqa: E402

from monaserve.adapters import Backbone, create_swin  # noqa: E402
from monaserve.testing.images import BackgroundBuild, LocalImages, cannot_build  # noqa: E402

from helpers import TINY  # noqa: E402

ALL_FRONT_ENDS = os.environ.get("MONASERVE_TEST_FRONT_ENDS") == "all"
"""Whether every module that uses `front_ends` runs its servers both ways (8 minutes more on 2 cores), or
only those marked `both_ways`."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts processes of its own is slow: the fast tier (-m 'not slow') runs in this process.
    A two-front-end run of a module not marked `both_ways` is left out unless MONASERVE_TEST_FRONT_ENDS=all."""
    kept, left_out = [], []
    for item in items:
        if item.get_closest_marker("process") is not None:
            item.add_marker(pytest.mark.slow)
        params = getattr(item, "callspec", None)
        two_ways = params is not None and params.params.get("front_ends") == 2
        (left_out if two_ways and not ALL_FRONT_ENDS and item.get_closest_marker("both_ways") is None else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


FIGURES = pytest.StashKey[list[str]]()
IMAGE_BUILD = pytest.StashKey[BackgroundBuild]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """A run with container tests starts building their images now, niced, so that the minutes of building
    overlap the tests before them; tests/test_image.py waits for the build."""
    if session.config.option.collectonly or cannot_build() is not None:
        return
    if any(item.get_closest_marker("container") is not None for item in session.items):
        workdir = Path(tempfile.mkdtemp(prefix="monaserve-images-"))
        session.config.stash[IMAGE_BUILD] = BackgroundBuild(LocalImages(workdir, niceness=10))


@pytest.fixture(scope="module")
def container_images(request: pytest.FixtureRequest, report_figures) -> Iterator[LocalImages]:
    """The images built for this run (in the background since collection); removed after the module."""
    if (reason := cannot_build()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: .ci/run runs as root and installs them")
        pytest.skip(reason)
    build = request.config.stash[IMAGE_BUILD]
    try:
        built = build.result()
        size = built.size_bytes()
        report_figures("image", {"build_s": built.seconds, "monaserve_cpu_bytes": size, "monaserve_cpu_gb": round(size / 1e9, 2)})
        yield built
    finally:
        build.remove()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Images built for a run that stopped before its container tests ran are removed too."""
    if (build := session.config.stash.get(IMAGE_BUILD, None)) is not None:
        build.remove()


@pytest.fixture(scope="session")
def report_figures(request: pytest.FixtureRequest) -> Callable[[str, dict], None]:
    """Record what a test measured (an image's size, its build time) for the run's summary, where CI's log keeps it."""
    figures = request.config.stash.setdefault(FIGURES, [])
    return lambda what, values: figures.append(f"{what}: {json.dumps(values)}")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The figures tests recorded with `report_figures`."""
    if figures := config.stash.get(FIGURES, []):
        terminalreporter.section("figures")
        for line in figures:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-front-ends"])
def front_ends(request: pytest.FixtureRequest) -> Iterator[int]:
    """Every server a module starts runs as one process, then as an engine process and two front ends
    (`MONASERVE_WORKERS`, which a `--workers` flag overrides): what holds for one must hold for both."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MONASERVE_WORKERS", str(request.param))
        yield request.param


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the session's compiled engines and servers: a graph compiles once."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Swin-T saved as safetensors: the offline stand-in for downloaded weights."""
    path = tmp_path_factory.mktemp("weights") / f"{TINY}.safetensors"
    safetensors.torch.save_file(create_swin(TINY, "random", seed=1234).state_dict(), path)
    return path


@pytest.fixture
def tiny_backbone(tiny_weights: Path) -> Backbone:
    """A fresh Backbone from `tiny_weights` (each test may inject into its own)."""
    return Backbone.load(TINY, tiny_weights)


@pytest.fixture(scope="session")
def shared_backbone(tiny_weights: Path) -> Backbone:
    """A read-only Backbone from `tiny_weights`, for making manifests and packages (never inject into it)."""
    return Backbone.load(TINY, tiny_weights)


@pytest.fixture(scope="session")
def s3_endpoint() -> dict[str, str]:
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket; returns the AWS environment to reach it."""
    from moto.server import ThreadedMotoServer

    from server_harness import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("monaserve-test")
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
