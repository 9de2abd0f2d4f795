"""Runs `monaserve` on reduced-depth Swins, so tests can compile a real server's engine in seconds
rather than the minutes a full Swin takes on the CPU.

    python -m monaserve.testing.reduced 1,1,1,1  /path/to/monaserve serve --weights FILE ...

Every backbone the server builds gets these block depths per stage (timm's `depths`), so `--weights`
must come from a model of the same depths. It reaches the server's child processes too (`--workers`).
This lives with the test tools, never in the server: production code builds the architecture it names.
"""

from __future__ import annotations

import sys

from .faults import run_in_children


def install(depths: tuple[int, ...]) -> None:
    """Give every `Backbone.load` in this process `depths`, unless its caller names others."""
    from monaserve.adapters.swin import Backbone

    load = Backbone.load.__func__

    def reduced(cls, name, weights="random", seed=0, **kwargs):
        return load(cls, name, weights, seed, **{"depths": depths, **kwargs})

    Backbone.load = classmethod(reduced)


def main() -> int:
    depths_text, _console_script, *argv = sys.argv[1:]
    depths = tuple(int(d) for d in depths_text.split(","))
    install(depths)
    run_in_children(f"from monaserve.testing.reduced import install\n\ninstall({depths!r})\n")
    from monaserve.server.cli import main as monaserve_main

    return monaserve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
