"""Runs `monaserve` with one function patched to raise, so tests can make a real server fail inside a request.

    python -m monaserve.testing.faults monaserve.adapters.kinds.segment:Segment.to_json[,module:function...]  /path/to/monaserve serve ...

Each patched function raises `RuntimeError("injected fault")` on every call. This lives with the test
tools, never in the server: production code has no switch that makes it fail.
"""

from __future__ import annotations

import importlib
import sys


def patch_to_raise(target: str) -> None:
    """Replace `module:function` (or `module:Class.method`) with one that raises."""
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    getattr(owner, name)  # fail loudly at start-up if the target moved

    def injected_fault(*args, **kwargs):
        raise RuntimeError("injected fault")

    setattr(owner, name, injected_fault)


def main() -> int:
    targets, _console_script, *argv = sys.argv[1:]
    for target in targets.split(","):
        patch_to_raise(target)
    from monaserve.server.cli import main as monaserve_main

    return monaserve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
