"""Runs `monaserve` with functions patched to raise or to wait, so tests can make a real server fail or
stall inside a request at a point of their choosing.

    python -m monaserve.testing.faults TARGET[,TARGET...]  /path/to/monaserve serve ...

A TARGET `module:function` (or `module:Class.method`) raises `RuntimeError("injected fault")` on every
call. A TARGET `module:function@GATE` runs as usual, except that while the file GATE exists each call
first creates `GATE.held` (so a test knows the call has arrived) and waits for GATE to be removed.
The patches reach the server's child processes too (under `--workers`): each Python the server starts
applies them as it starts, from a `sitecustomize` put first on its `PYTHONPATH`.
This lives with the test tools, never in the server: production code has no switch that makes it fail.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOLD_POLL_S = 0.01
TARGETS_VARIABLE = "MONASERVE_TEST_FAULTS"
"""Where the targets travel to the server's child processes."""


def injected_fault(original: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for `original` that raises on every call."""

    @functools.wraps(original)
    def fault(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    return fault


def held_at(gate: Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper for `original` that, while `gate` exists, marks `gate.held` and waits before calling it."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def held(*args: Any, **kwargs: Any) -> Any:
            if gate.exists():
                gate.with_name(gate.name + ".held").touch()
                while gate.exists():
                    time.sleep(HOLD_POLL_S)
            return original(*args, **kwargs)

        return held

    return wrap


def patch(target: str) -> None:
    """Replace `module:function` with a raising stand-in, or wrap `module:function@GATE` in a hold."""
    location, _, gate = target.partition("@")
    module_name, _, attribute = location.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)  # fail loudly at start-up if the target moved
    setattr(owner, name, held_at(Path(gate))(original) if gate else injected_fault(original))


def patch_from_environment() -> None:
    """Apply the targets a parent process left in `TARGETS_VARIABLE` (in a child, as it starts)."""
    for target in filter(None, os.environ.get(TARGETS_VARIABLE, "").split(",")):
        patch(target)


def run_in_children(code: str) -> None:
    """Make every Python started from here on (a server's child processes) run `code` as it starts: a
    `sitecustomize` put first on their `PYTHONPATH`."""
    folder = tempfile.mkdtemp(prefix="monaserve-children-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as file:
        file.write(code)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))


def main() -> int:
    targets, _console_script, *argv = sys.argv[1:]
    for target in targets.split(","):
        patch(target)
    os.environ[TARGETS_VARIABLE] = targets
    run_in_children("from monaserve.testing.faults import patch_from_environment\n\npatch_from_environment()\n")
    from monaserve.server.cli import main as monaserve_main

    return monaserve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
