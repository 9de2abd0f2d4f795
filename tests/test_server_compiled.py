"""`monaserve serve --compile`: a real server on a reduced-depth Swin answers as the eager server does."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors.torch

from monaserve.adapters import Backbone, InputSpec, create_swin

from helpers import TINY, random_package
from server_harness import TOKEN, ServerProcess, image_bytes, store_of

pytestmark = [pytest.mark.process, pytest.mark.slow]

DEPTHS = "1,1,1,1"
TASKS = {"pets": "classify", "boxes": "detect", "masks": "segment"}
SERVE = ("--max-batch", "2", "--gpu-slots", "4", "--max-delay-ms", "50", "--device", "cpu", "--log-level", "info")
LAUNCHER = [sys.executable, "-m", "monaserve.testing.reduced", DEPTHS]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A reduced-depth Swin-T's weights file and its backbone (for packages that fit it)."""
    depths = tuple(int(d) for d in DEPTHS.split(","))
    path = tmp_path_factory.mktemp("reduced") / "reduced.safetensors"
    safetensors.torch.save_file(create_swin(TINY, "random", seed=5, depths=depths).state_dict(), path)
    return path, Backbone.load(TINY, path, depths=depths)


@pytest.fixture(scope="module")
def store(tmp_path_factory, reduced):
    _, backbone = reduced
    packages = [
        random_package(backbone, name, seed=i, kind=kind, num_labels=3, input=InputSpec(size=(64, 64)))
        for i, (name, kind) in enumerate(TASKS.items())
    ]
    return store_of(tmp_path_factory, packages)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, reduced, store, compile_cache):
    """The same store served compiled and eager, side by side (the compile cache is the session's: graphs
    that tests/test_compile.py compiled load from it)."""
    weights, _ = reduced
    logs, cache = tmp_path_factory.mktemp("logs"), compile_cache
    env = {"MONASERVE_ADMIN_TOKEN": TOKEN}
    compiled = ServerProcess(
        weights,
        store,
        *SERVE,
        "--compile",
        "--compile-cache",
        str(cache),
        env=env | {"TORCH_LOGS": "recompiles"},  # torch logs each recompile, and why, to the server's log
        log=logs / "compiled",
        launcher=LAUNCHER,
    )
    eager = ServerProcess(weights, store, *SERVE, "--no-compile", env=env, log=logs / "eager", launcher=LAUNCHER)
    with compiled.wait_ready(timeout=900), eager.wait_ready(timeout=300):
        yield compiled, eager, cache
    compiled.stop(), eager.stop()


def assert_close(a: object, b: object, tol: float = 1e-3) -> None:
    """JSON answers equal but for float rounding."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=tol)
    else:
        assert a == b


def answer(server: ServerProcess, task: str, image: bytes) -> dict:
    with server.client() as client:
        response = client.post(f"/v1/tasks/{task}/{TASKS[task]}", files={"image": ("x.png", image, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    body.pop("timings_ms")
    return body


def test_compiled_graphs_are_ready_before_the_server_is(servers):
    compiled, _, cache = servers
    log = compiled.log()
    assert "compiling the batched forward for 2 images of 64x64" in log and "224x224" not in log
    assert any(cache.iterdir()), "the compile cache stayed empty"


@pytest.mark.parametrize("task", list(TASKS))
def test_each_kind_answers_as_the_eager_server_does(servers, task):
    compiled, eager, _ = servers
    image = image_bytes(3, size=(80, 60), fmt="PNG")
    assert_close(answer(compiled, task, image), answer(eager, task, image))


def test_a_burst_of_mixed_tasks_answers_as_single_requests_do(servers):
    """12 requests at once over three tasks: batches of mixed tasks, padded to the buckets."""
    compiled, eager, _ = servers
    work = [(task, image_bytes(10 + i, size=(64, 64), fmt="PNG")) for i, task in enumerate(list(TASKS) * 4)]
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda item: answer(compiled, *item), work))
    for (task, image), got in zip(work, burst):
        assert_close(got, answer(eager, task, image))
    after_ready = compiled.log().split(" ready: ", 1)[1]
    assert "Recompiling" not in after_ready, "a request made the compiled server compile again"
