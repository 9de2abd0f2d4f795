"""monaserve against its closest peer, side by side in one run: KServe's Python model server (the same
FastAPI/uvicorn stack) doing the same per-image work (decode, resize to 224, normalise) with a constant
model, and monaserve with its engine's forward a constant (`frontend_bench.py`'s server), under the
same wrk load, one image per request.

Two pairs of requests per image: the Open Inference Protocol's JSON with the image as base64 BYTES
(the same body to both), and each server's simplest image request (monaserve's raw body on /v1,
KServe's v1 `{"instances": [{"b64": ...}]}`). The ratio is monaserve's req/s over KServe's.

    python3 -m venv .kserve && .kserve/bin/pip install kserve pillow
    python bench/peer_bench.py --kserve-python .kserve/bin/python

KServe runs in its own interpreter (`bench/kserve_peer.py`), so neither server's dependencies touch
the other's.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from monaserve.testing import find_tool, free_port

from common import print_table, write_result
from frontend_bench import CASES, TASK, bench_server, case_image, oip_body, request_script, run_wrk

KSERVE_PEER = Path(__file__).resolve().with_name("kserve_peer.py")


class KServePeer:
    """`kserve_peer.py` under KServe's interpreter, on a free port, until exit."""

    def __init__(self, python: str, log: Path) -> None:
        self.python, self.log = python, log
        self.url = f"http://127.0.0.1:{free_port()}"

    def __enter__(self) -> KServePeer:
        port = self.url.rsplit(":", 1)[1]
        command = [self.python, str(KSERVE_PEER), "--http_port", port]
        self.process = subprocess.Popen(command, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the KServe peer exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + f"/v2/models/{TASK}/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the KServe peer did not become ready:\n{self.log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


Target = tuple[str, Path, str]
"""A request to load one server with: (url, wrk script, content type)."""


def requests_for(case: str, folder: Path, ours: str, peer: str) -> list[tuple[str, Target, Target]]:
    """(pair name, our request, the peer's) for one image."""
    data, content_type = case_image(case)
    json_type = "application/json"
    v2 = request_script(folder, f"{case}-v2", oip_body(data), json_type)
    v1_ours = request_script(folder, f"{case}-v1-ours", data, content_type)
    v1_peer_body = json.dumps({"instances": [{"b64": base64.b64encode(data).decode()}]}).encode()
    v1_peer = request_script(folder, f"{case}-v1-peer", v1_peer_body, json_type)
    return [
        ("v2 JSON, same body", (f"{ours}/v2/models/{TASK}/infer", v2, json_type), (f"{peer}/v2/models/{TASK}/infer", v2, json_type)),
        (
            "v1, each its simplest",
            (f"{ours}/v1/tasks/{TASK}/classify", v1_ours, content_type),
            (f"{peer}/v1/models/{TASK}:predict", v1_peer, json_type),
        ),
    ]


def measure(wrk: str, target: Target, args: argparse.Namespace) -> dict:
    """One answer checked (a 200), then wrk's figures."""
    url, script, content_type = target
    body = script.with_suffix(".body").read_bytes()
    httpx.post(url, content=body, headers={"content-type": content_type}, timeout=60).raise_for_status()
    return run_wrk(wrk, url, args, script)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kserve-python", default=os.environ.get("KSERVE_PYTHON"), help="the interpreter KServe is installed in")
    parser.add_argument("--label", default="now", help="names the result file: peer-<label>-<cpu>.json")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--cases", default="png-32,jpeg-512", help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--server-args", default="", help="extra `monaserve serve` flags")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    wrk = find_tool("wrk")
    if wrk is None or args.kserve_python is None:
        raise SystemExit("needs wrk (apt-get install wrk) and --kserve-python (see this script's docstring)")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ours = bench_server(folder, ["--device", "cpu", *args.server_args.split()])
        with ours, KServePeer(args.kserve_python, folder / "kserve.log") as peer:
            for case in args.cases.split(","):
                for pair, our_request, peer_request in requests_for(case, folder, ours.url, peer.url):
                    measured_ours, measured_peer = measure(wrk, our_request, args), measure(wrk, peer_request, args)
                    ratio = measured_ours["requests_per_s"] / measured_peer["requests_per_s"]
                    result = {"case": case, "pair": pair, "monaserve": measured_ours, "kserve": measured_peer, "ratio": round(ratio, 2)}
                    results.append(result)
                    rows.append([case, pair, measured_ours["requests_per_s"], measured_peer["requests_per_s"], f"{ratio:.2f}x"])
    print_table(["image", "request", "monaserve req/s", "KServe req/s", "ratio"], rows)
    version = "from importlib.metadata import version; print(version('kserve'))"
    peer_version = subprocess.run([args.kserve_python, "-c", version], capture_output=True, text=True, check=True)
    settings = {"duration_s": args.duration, "connections": args.connections, "wrk_threads": args.threads, "server_args": args.server_args}
    settings |= {"cpus": os.cpu_count(), "kserve": peer_version.stdout.strip()}
    path = write_result(f"peer-{args.label}", torch.device("cpu"), {"settings": settings, "cases": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
