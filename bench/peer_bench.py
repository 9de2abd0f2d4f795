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
from frontend_bench import CASES, TASK, constant_server, oip_body, request_script, run_wrk

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


def requests_for(case: str, folder: Path, ours: str, peer: str) -> list[tuple[str, tuple[str, Path], tuple[str, Path]]]:
    """(pair name, (our url, wrk script), (the peer's url, wrk script)) for one image."""
    data, content_type = CASES[case]()
    v2 = request_script(folder, f"{case}-v2", oip_body(data), "application/json")
    v1_ours = request_script(folder, f"{case}-v1-ours", data, content_type)
    v1_peer_body = json.dumps({"instances": [{"b64": base64.b64encode(data).decode()}]}).encode()
    v1_peer = request_script(folder, f"{case}-v1-peer", v1_peer_body, "application/json")
    return [
        ("v2 JSON, same body", (f"{ours}/v2/models/{TASK}/infer", v2), (f"{peer}/v2/models/{TASK}/infer", v2)),
        ("v1, each its simplest", (f"{ours}/v1/tasks/{TASK}/classify", v1_ours), (f"{peer}/v1/models/{TASK}:predict", v1_peer)),
    ]


def check_answers(url: str, script: Path) -> None:
    """One request before the load: a 200."""
    content_type = "application/json" if "v2" in script.name or "peer" in script.name else "image/jpeg"
    response = httpx.post(url, content=script.with_suffix(".body").read_bytes(), headers={"content-type": content_type}, timeout=60)
    response.raise_for_status()


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
        ours = constant_server(folder, ["--device", "cpu", *args.server_args.split()])
        with ours, KServePeer(args.kserve_python, folder / "kserve.log") as peer:
            for case in args.cases.split(","):
                for pair, (our_url, our_script), (peer_url, peer_script) in requests_for(case, folder, ours.url, peer.url):
                    check_answers(our_url, our_script)
                    check_answers(peer_url, peer_script)
                    measured_ours = run_wrk(wrk, our_url, args, our_script)
                    measured_peer = run_wrk(wrk, peer_url, args, peer_script)
                    ratio = measured_ours["requests_per_s"] / measured_peer["requests_per_s"]
                    result = {"case": case, "pair": pair, "monaserve": measured_ours, "kserve": measured_peer, "ratio": round(ratio, 2)}
                    results.append(result)
                    rows.append([case, pair, measured_ours["requests_per_s"], measured_peer["requests_per_s"], f"{ratio:.2f}x"])
    print_table(["image", "request", "monaserve req/s", "KServe req/s", "ratio"], rows)
    peer_version = subprocess.run([args.kserve_python, "-c", "import kserve; print(kserve.__version__)"], capture_output=True, text=True)
    settings = {"duration_s": args.duration, "connections": args.connections, "wrk_threads": args.threads, "server_args": args.server_args}
    settings |= {"cpus": os.cpu_count(), "kserve": peer_version.stdout.strip()}
    path = write_result(f"peer-{args.label}", torch.device("cpu"), {"settings": settings, "cases": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
