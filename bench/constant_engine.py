"""Runs `monaserve` with the engine's forward replaced by a constant answer per slot, so that only the
front end (HTTP, decoding, preparing, batching, post-processing, answers) costs anything:

    python bench/constant_engine.py /path/to/monaserve serve ...

For `frontend_bench.py` only; the server has no such switch. Each slot's answer has its kind's real
shape (classify probabilities over its labels, no boxes, an all-background class map), made once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def constant_run(self, images: torch.Tensor, slots) -> list:
    """`Engine.run` without the model: each image gets its slot's constant prediction."""
    answers = self.__dict__.setdefault("_constant_answers", {})
    outputs = []
    for slot in torch.as_tensor(slots).tolist():
        if slot not in answers:
            manifest = self.manifests[slot]
            answers[slot] = {
                "classify": lambda m: torch.full((len(m.labels),), 1.0 / len(m.labels)),
                "detect": lambda m: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
                "segment": lambda m: torch.zeros(m.input.size, dtype=torch.int32),
            }[manifest.kind](manifest)
        outputs.append(answers[slot])
    return outputs


def install() -> None:
    """Replace `Engine.run` in this process (under `--workers`, also in the engine process, as it starts)."""
    from monaserve.server.engine import Engine

    Engine.run = constant_run


def main() -> int:
    from monaserve.server.cli import main as monaserve_main
    from monaserve.testing.faults import run_in_children

    install()
    here = str(Path(__file__).resolve().parent)
    run_in_children(f"import sys\n\nsys.path.insert(0, {here!r})\nfrom constant_engine import install\n\ninstall()\n")
    _console_script, *argv = sys.argv[1:]
    return monaserve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
