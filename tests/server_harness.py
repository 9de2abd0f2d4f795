"""Real `monaserve serve` processes for tests (from `monaserve.testing`) over stores of random tasks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from monaserve.adapters import AdapterPackage
from monaserve.testing import MONASERVE, TOKEN, ServerProcess, free_port, image_bytes

__all__ = ["MONASERVE", "TOKEN", "ServerProcess", "free_port", "image_bytes", "serve_tasks", "store_of", "store_with_tasks"]


def store_of(tmp_path_factory, packages: Iterable[AdapterPackage]) -> Path:
    """A new store holding `packages`, each as its task's version."""
    store = tmp_path_factory.mktemp("store")
    for package in packages:
        package.save(store / package.manifest.name / f"{package.manifest.version}.safetensors")
    return store


def store_with_tasks(tmp_path_factory, backbone, tasks: dict[str, str], input_size: int | None = None) -> Path:
    """A new store holding v1 of each task (name -> kind; random weights, 4 labels; at the backbone's
    input size unless `input_size`)."""
    from monaserve.adapters import InputSpec

    from helpers import random_package

    fields = {} if input_size is None else {"input": InputSpec(size=(input_size, input_size))}
    return store_of(
        tmp_path_factory,
        [random_package(backbone, name, seed=len(name), kind=kind, num_labels=4, **fields) for name, kind in tasks.items()],
    )


def serve_tasks(
    tmp_path_factory,
    weights: Path,
    backbone,
    tasks: dict[str, str],
    *args: str,
    input_size: int | None = None,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """A server process (enter it to start) with the admin token, over `store_with_tasks`."""
    store = store_with_tasks(tmp_path_factory, backbone, tasks, input_size)
    log = tmp_path_factory.mktemp("log") / "log"
    return ServerProcess(weights, store, *args, env={"MONASERVE_ADMIN_TOKEN": TOKEN, **(env or {})}, log=log, launcher=launcher)
