"""The front end's own rate: the real server with the engine's forward replaced by a constant
(`bench/constant_engine.py`, in this benchmark only), under wrk, one image per request.

For each image (a 32-px PNG, a 512-px JPEG, a 4000x3000 JPEG; all for a classify task at 224 px) and
each protocol (/v1 raw body, /v2 JSON with the image as BYTES), it reports requests/s, p50 and p99,
and the same run's framework floor: `GET /health/live` under the same load. Ratios to the floor say
how much of the HTTP stack's rate the inference path keeps.

    python bench/frontend_bench.py --label before       # writes bench/results/frontend-before-<cpu>.json
    python bench/frontend_bench.py --baseline 3c01a4d   # and that revision's server, case by case, in the same run
    python bench/frontend_bench.py --replicas 2         # two servers at once: what two front-end processes could do
    python bench/frontend_bench.py --server-args "--workers 2" --versus-args "--workers 1"   # two ways, side by side
    python bench/frontend_bench.py --engine real --device cuda --backbone swin_base_patch4_window7_224

wrk comes from Debian's packages (apt-get install wrk). The load generator shares the machine's cores
with the server, as it would with a load balancer on the same box; the table says how many there were.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.adapters.synthetic import random_package
from monaserve.testing import ServerProcess, find_tool

from common import print_table, random_backbone_file, write_result
from serve_bench import engine_counters

CONSTANT_ENGINE = Path(__file__).resolve().with_name("constant_engine.py")
REPOSITORY = Path(__file__).resolve().parents[1]
TASK = "frontend"
SWIN_T = "swin_tiny_patch4_window7_224"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def image(width: int, height: int, fmt: str) -> bytes:
    """A smooth test image (photograph-like compressibility, not noise) encoded as `fmt`."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 127 // max(1, width + height))], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


CASES = {
    "png-32": lambda: (image(32, 32, "PNG"), "image/png"),
    "jpeg-512": lambda: (image(512, 512, "JPEG"), "image/jpeg"),
    "jpeg-4000x3000": lambda: (image(4000, 3000, "JPEG"), "image/jpeg"),
}


@functools.cache
def case_image(case: str) -> tuple[bytes, str]:
    """One case's image and content type, made once (the 4000x3000 JPEG takes a while to encode)."""
    return CASES[case]()


def request_script(folder: Path, name: str, body: bytes, content_type: str) -> Path:
    """A wrk Lua script that POSTs `body`."""
    body_path = folder / f"{name}.body"
    body_path.write_bytes(body)
    script = folder / f"{name}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f'local f = io.open("{body_path}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    return script


def oip_body(data: bytes) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]}
    ).encode()


def run_wrk(wrk: str, url: str, args: argparse.Namespace, script: Path | None = None) -> dict:
    """One wrk run: requests/s, p50/p99 in ms, and the count of answers that were not 2xx."""
    command = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", "--timeout", "30s"]
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE).groups()
        return round(float(value) * UNITS[unit], 2)

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)$", out, re.MULTILINE)
    return {
        "requests_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else "",
    }


def task_files(folder: Path, backbone_name: str = SWIN_T) -> tuple[Path, Path]:
    """A random backbone's weights, and a store with one 1000-label classify task at 224 px."""
    weights = folder / "backbone.safetensors"
    backbone = random_backbone_file(backbone_name, weights)
    store = folder / "store"
    package = random_package(backbone, TASK, seed=0, num_labels=1000, input=InputSpec(size=(224, 224)))
    package.save(store / TASK / "1.safetensors")
    return weights, store


def bench_server(
    folder: Path, server_args: list[str], weights: Path | None = None, store: Path | None = None, constant: bool = True
) -> ServerProcess:
    """`monaserve serve` (enter it to start) over `task_files` (made in `folder` unless given), with the
    engine's forward a constant (or, with `constant=False`, the real engine)."""
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None or store is None:
        weights, store = task_files(folder)
    launcher = [sys.executable, str(CONSTANT_ENGINE)] if constant else None
    return ServerProcess(weights, store, *server_args, log=folder / "server.log", launcher=launcher)


def baseline_server(
    folder: Path, revision: str, server_args: list[str], weights: Path, store: Path, constant: bool = True
) -> ServerProcess:
    """The same server from this repository's code at `revision` (`git archive`, imported ahead of the
    installed package; the same interpreter and packages), to measure against in the same run."""
    tree, path = folder / "tree", folder / "path"
    tree.mkdir(parents=True)
    path.mkdir()  # holds `monaserve`, a link to the tree, for PYTHONPATH
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (path / "monaserve").symlink_to(tree)
    where = [sys.executable, "-c", "import monaserve.server.cli as cli; print(cli.__file__)"]
    imported = subprocess.run(where, env={**os.environ, "PYTHONPATH": str(path)}, capture_output=True, text=True, check=True)
    if not Path(imported.stdout.strip()).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the baseline would not run {revision}'s code: monaserve imports from {imported.stdout.strip()}")
    launcher = [sys.executable, str(tree / "bench" / "constant_engine.py")] if constant else None
    return ServerProcess(weights, store, *server_args, log=folder / "server.log", launcher=launcher, env={"PYTHONPATH": str(path)})


def request_for(folder: Path, case: str, protocol: str) -> tuple[str, Path, str]:
    """(path, wrk script, content type) of one image on one protocol."""
    data, content_type = case_image(case)
    if protocol == "v1":
        return f"/v1/tasks/{TASK}/classify", request_script(folder, f"{case}-v1", data, content_type), content_type
    return f"/v2/models/{TASK}/infer", request_script(folder, f"{case}-v2", oip_body(data), "application/json"), "application/json"


def run_wrk_on(wrk: str, urls: list[str], args: argparse.Namespace, script: Path | None = None) -> dict:
    """wrk on every url at once, the connections shared out: requests/s and non-2xx summed, the worst p50/p99."""
    if len(urls) == 1:
        return run_wrk(wrk, urls[0], args, script)
    share = argparse.Namespace(**{**vars(args), "connections": max(1, args.connections // len(urls)), "threads": 1})
    with ThreadPoolExecutor(len(urls)) as pool:
        runs = list(pool.map(lambda url: run_wrk(wrk, url, share, script), urls))
    return {
        "requests_per_s": round(sum(r["requests_per_s"] for r in runs), 1),
        "p50_ms": max(r["p50_ms"] for r in runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": "; ".join(r["socket_errors"] for r in runs if r["socket_errors"]),
        "per_replica": [r["requests_per_s"] for r in runs],
    }


def measure(wrk: str, servers: list[ServerProcess], folder: Path, case: str, protocol: str, args: argparse.Namespace) -> dict:
    """One answer checked per server, then wrk's figures for one image on one protocol; with the real
    engine, also the engines' own images/s over the run (images per second of batch time, from
    /metrics) and the served rate as a fraction of it."""
    path, script, content_type = request_for(folder, case, protocol)
    body = script.with_suffix(".body").read_bytes()
    clients = [server.client(token=None) for server in servers]
    with contextlib.ExitStack() as open_clients:
        for client in clients:
            open_clients.enter_context(client).post(path, content=body, headers={"content-type": content_type}).raise_for_status()
        before = [engine_counters(client) for client in clients]
        measured = run_wrk_on(wrk, [server.url + path for server in servers], args, script)
        if args.engine == "real":
            after = [engine_counters(client) for client in clients]
            runs = [{k: a[k] - b[k] for k in ("images", "seconds", "batches")} for a, b in zip(after, before)]
            if all(run["batches"] for run in runs):
                engine_rate = sum(run["images"] / run["seconds"] for run in runs)  # the engines run side by side
                mean_batch = sum(run["images"] for run in runs) / sum(run["batches"] for run in runs)
                measured |= {"engine_images_per_s": round(engine_rate, 1), "mean_batch": round(mean_batch, 1)}
                measured["end_to_end_fraction"] = round(measured["requests_per_s"] / engine_rate, 3)
            else:  # no batch ran: every request failed, as non_2xx says
                measured |= {"engine_images_per_s": None, "mean_batch": None, "end_to_end_fraction": None}
    return measured


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="the server's --device (its engine answers a constant either way)")
    parser.add_argument("--label", default="now", help="names the result file: frontend-<label>-<cpu>.json")
    parser.add_argument("--engine", choices=["constant", "real"], default="constant", help="the engine's forward: a constant, or the model")
    parser.add_argument("--backbone", default=SWIN_T, help="the random backbone the server runs (matters with --engine real)")
    parser.add_argument(
        "--replicas", type=int, default=1, help="independent servers, the load shared out: the ceiling for that many front-end processes"
    )
    parser.add_argument("--baseline", help="a git revision of this repository to run side by side, case by case (e.g. 3c01a4d)")
    parser.add_argument(
        "--versus-args", help="instead of --baseline: this code with these `monaserve serve` flags as the baseline, e.g. '--workers 1'"
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--protocols", default="v1,v2", help="v1, v2 or both")
    parser.add_argument("--server-args", default="", help="extra `monaserve serve` flags, e.g. '--decode-threads 2'")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    wrk = find_tool("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    server_args = ["--device", args.device, *args.server_args.split()]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        folder = Path(tmp)
        weights, store = task_files(folder, args.backbone)
        constant = args.engine == "constant"
        servers = {"now": [bench_server(folder / f"now-{i}", server_args, weights, store, constant) for i in range(args.replicas)]}
        if args.baseline:
            baseline = [
                baseline_server(folder / f"baseline-{i}", args.baseline, server_args, weights, store, constant)
                for i in range(args.replicas)
            ]
            servers["baseline"] = baseline
        elif args.versus_args is not None:
            versus = [*server_args, *args.versus_args.split()]  # later flags win
            servers["baseline"] = [bench_server(folder / f"versus-{i}", versus, weights, store, constant) for i in range(args.replicas)]
        for server in [s for side in servers.values() for s in side]:
            running.enter_context(server)
        floors = {name: run_wrk_on(wrk, [s.url + "/health/live" for s in side], args) for name, side in servers.items()}
        rows, results = [], []
        for case in args.cases.split(","):
            for protocol in args.protocols.split(","):
                measured = {name: measure(wrk, side, folder, case, protocol, args) for name, side in servers.items()}
                now = measured["now"]
                results.append(
                    {"case": case, "protocol": protocol, "bytes": len(case_image(case)[0]), **now, "baseline": measured.get("baseline")}
                )
                row = [
                    case,
                    protocol,
                    now["requests_per_s"],
                    now["p50_ms"],
                    now["p99_ms"],
                    f"{now['requests_per_s'] / floors['now']['requests_per_s']:.3f}",
                ]
                if "baseline" in measured:
                    before = measured["baseline"]["requests_per_s"]
                    row += [before, f"{now['requests_per_s'] / before:.2f}x"]
                if not constant:
                    row += [now["engine_images_per_s"], now["mean_batch"], now["end_to_end_fraction"]]
                rows.append([*row, now["non_2xx"] + sum(m["non_2xx"] for m in measured.values() if m is not now)])
    for name, floor in floors.items():
        print(f"health floor of {name} (GET /health/live, same run): {floor['requests_per_s']} req/s, p50 {floor['p50_ms']} ms")
    headers = ["image", "protocol", "req/s", "p50 ms", "p99 ms", "x floor"]
    headers += ["baseline req/s", "vs baseline"] if "baseline" in floors else []
    headers += [] if args.engine == "constant" else ["engine images/s", "mean batch", "served / engine"]
    print_table([*headers, "non-2xx"], rows)
    settings = {
        "duration_s": args.duration,
        "connections": args.connections,
        "wrk_threads": args.threads,
        "server_args": args.server_args,
        "engine": args.engine,
        "replicas": args.replicas,
        "backbone": args.backbone,
        "cpus": os.cpu_count(),
        "baseline": args.baseline,
        "versus_args": args.versus_args,
    }
    result = {"settings": settings, "health_floor": floors["now"], "baseline_health_floor": floors.get("baseline"), "cases": results}
    path = write_result(f"frontend-{args.label}", torch.device("cpu"), result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
