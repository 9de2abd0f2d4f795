"""gRPC against REST on the same load, side by side in one run: the Open Inference Protocol's ModelInfer
(raw contents) against `/v2` REST with the binary tensor extension, the same image, the same server, the
same number of requests in flight, from one asyncio load generator (in a process of its own; over REST
a prepared request on keep-alive connections, the least a Python client can spend on one).

    python bench/grpc_bench.py                         # the engine's forward a constant: the protocol stacks' own cost
    python bench/grpc_bench.py --engine real           # the real Swin-T engine
    python bench/grpc_bench.py --cases png-32,jpeg-512 --duration 20 --concurrency 16 --rounds 3

Rounds alternate the protocols so that drift on a shared machine falls on both; the table gives
requests/s, p50 and p99 per protocol and gRPC's rate as a ratio of REST's, and the server's own CPU time
per request (its process tree's, read from /proc): the load generator shares the machine and its two
clients do not cost the same, so the server's CPU per request is the fairer figure of what each
protocol costs to serve. Results go to
`bench/results/grpc-<engine>-engine-<cpu>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import statistics
import struct
import time
from pathlib import Path

import grpc
import torch

from monaserve.server.oip_proto import grpc_service_pb2 as pb
from monaserve.server.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub

from common import print_table, scratch_folder, write_result
from frontend_bench import TASK, bench_server, case_image, task_files

PROTOCOLS = ("rest", "grpc")


def rest_body(data: bytes) -> tuple[bytes, dict[str, str]]:
    """A `/v2` request with the image as BYTES in the binary tensor extension, as Triton's HTTP client sends it."""
    header = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data) + 4}}]}
    ).encode()
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    return header + struct.pack("<I", len(data)) + data, headers


def grpc_request(data: bytes) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    return pb.ModelInferRequest(model_name=TASK, inputs=[tensor], raw_input_contents=[struct.pack("<I", len(data)) + data])


class KeepAliveConnection:
    """One HTTP/1.1 keep-alive connection sending one prepared request again and again: the least a
    Python client can do per request, so that the load generator's cost does not favour gRPC's C core."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> bool:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        await self.reader.readexactly(length)
        return head.startswith(b"HTTP/1.1 200")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rest_request(url: str, data: bytes) -> tuple[str, int, bytes]:
    """(host, port, the whole HTTP/1.1 request) of one image to `/v2` with the binary tensor extension."""
    host, port = url.removeprefix("http://").split(":")
    body, headers = rest_body(data)
    lines = [f"POST /v2/models/{TASK}/infer HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return host, int(port), ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def load(protocol: str, url: str, target: str, data: bytes, concurrency: int, duration: float) -> dict:
    """`concurrency` callers, each sending its next request when its last is answered, for `duration` s:
    over REST each on its own keep-alive connection, over gRPC all on one channel (HTTP/2 streams)."""
    latencies, failures = [], 0
    deadline = time.perf_counter() + duration
    channel = grpc.aio.insecure_channel(target)
    stub, request = GRPCInferenceServiceStub(channel), grpc_request(data)
    connections = [KeepAliveConnection(*rest_request(url, data)) for _ in range(concurrency)]

    async def caller(connection: KeepAliveConnection) -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                if protocol == "rest":
                    ok = await connection.call()
                else:
                    await stub.ModelInfer(request, timeout=60)
                    ok = True
            except (OSError, asyncio.IncompleteReadError, grpc.RpcError):
                ok = False
            latencies.append(time.perf_counter() - started)
            failures += not ok

    started = time.perf_counter()
    await asyncio.gather(*[caller(connection) for connection in connections])
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    await channel.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "failures": failures,
    }


TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) used so far by process `pid` and its descendants (under `--workers`)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)  # ppid, utime + stime
    tree, total = {pid}, 0.0
    changed = True  # a child's pid is not always above its parent's: walk until nothing joins
    while changed:
        joined = {p for p, (ppid, _) in stats.items() if ppid in tree and p not in tree}
        tree |= joined
        changed = bool(joined)
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


def load_in(generator: multiprocessing.pool.Pool, server_pid: int, *args) -> dict:
    """`load` in the load generator's process (not this interpreter), with the server's CPU seconds per
    request over the same span: what the protocol costs the server, whatever the load generator spends."""
    before = tree_cpu_s(server_pid)
    measured = generator.apply(run_load, args)
    measured["server_cpu_ms_per_request"] = 1000 * (tree_cpu_s(server_pid) - before) / max(1, measured["requests"])
    return measured


def run_load(*args) -> dict:
    return asyncio.run(load(*args))


def summarise(case: str, runs: dict[str, list[dict]], results: list[dict]) -> list[list]:
    """Each protocol's rounds of one case as a table row, appended to `results` in full: requests/s over
    all rounds, the median round's p50, p99 and server CPU per request, and each as a ratio to REST's."""
    rates = {p: sum(r["requests"] for r in rs) / sum(r["seconds"] for r in rs) for p, rs in runs.items()}
    cpu = {p: statistics.median(r["server_cpu_ms_per_request"] for r in rs) for p, rs in runs.items()}
    rows = []
    for protocol, measured in runs.items():
        p50, p99 = (statistics.median(r[key] for r in measured) for key in ("p50_ms", "p99_ms"))
        failures = sum(r["failures"] for r in measured)
        ratio, cost = rates[protocol] / rates["rest"], cpu[protocol] / cpu["rest"]
        row = [f"{rates[protocol]:.1f}", f"{p50:.1f}", f"{p99:.1f}", f"{ratio:.2f}x", f"{cpu[protocol]:.2f}", f"{cost:.2f}x"]
        rows.append([case, protocol, *row, failures])
        results.append(
            {
                "case": case,
                "protocol": protocol,
                "requests_per_s": rates[protocol],
                "p50_ms": p50,
                "p99_ms": p99,
                "vs_rest": ratio,
                "server_cpu_ms_per_request": cpu[protocol],
                "server_cpu_vs_rest": cost,
                "failures": failures,
                "rounds": measured,
            }
        )
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["constant", "real"], default="constant")
    parser.add_argument("--cases", default="png-32,jpeg-512", help="images, as frontend_bench.py names them")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per protocol per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--device", default="cpu", help="the server's --device")
    parser.add_argument("--server-args", default="", help="extra `monaserve serve` flags")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    folder = scratch_folder("monaserve-grpc-bench-")
    weights, store = task_files(folder)
    rows, results = [], []
    server_args = ["--device", args.device, *args.server_args.split()]
    server = bench_server(folder / "server", server_args, weights, store, constant=args.engine == "constant")
    with server, multiprocessing.get_context("spawn").Pool(1) as generator:
        for case in args.cases.split(","):
            data = case_image(case)[0]
            for protocol in PROTOCOLS:  # warm both paths
                load_in(
                    generator, server.process.pid, protocol, server.url, server.grpc_target, data, args.concurrency, min(2.0, args.duration)
                )
            runs = {protocol: [] for protocol in PROTOCOLS}
            for round_ in range(args.rounds):
                for protocol in PROTOCOLS if round_ % 2 == 0 else reversed(PROTOCOLS):
                    measured = load_in(
                        generator, server.process.pid, protocol, server.url, server.grpc_target, data, args.concurrency, args.duration
                    )
                    runs[protocol].append(measured)
            rows += summarise(case, runs, results)
    headers = ["image", "protocol", "req/s", "p50 ms", "p99 ms", "vs REST", "server CPU ms/req", "CPU vs REST", "failures"]
    print_table(headers, rows)
    settings = {"engine": args.engine, "concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds}
    print(write_result(f"grpc-{args.engine}-engine", torch.device(args.device), {"settings": settings, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
