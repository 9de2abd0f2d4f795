"""What every benchmark records: the device, library versions and exact command, and where results go."""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from monaserve.adapters import Backbone

RESULTS = Path(os.environ.get("MONASERVE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
"""Where results go: bench/results, or $MONASERVE_BENCH_RESULTS (the tests' smoke runs)."""


def scratch_folder(prefix: str) -> Path:
    """A fresh temporary folder, removed when the benchmark exits (its backbone and store are hundreds of MB)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def random_backbone_file(name: str, path: Path) -> Backbone:
    """A randomly initialised backbone `name` (seed 0), its weights saved to `path` for a server's `--weights`."""
    backbone = Backbone.load(name, "random")
    save_file(backbone.model.state_dict(), path)
    return backbone


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    import timm
    import torchvision

    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def write_result(kind: str, device: torch.device, result: dict) -> Path:
    """Write `result` with the environment to `bench/results/<kind>-<device>.json`; returns the path."""
    env = environment(device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{kind}-{slug(env['device'].split(' (')[0])}.json"
    path.write_text(json.dumps({"environment": env, **result}, indent=2) + "\n")
    return path


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(headers: list[str], rows: list[list]) -> None:
    """A Markdown table, so results paste into the README as they are."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
