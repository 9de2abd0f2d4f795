"""Server figures against a real `monaserve serve` on 127.0.0.1: throughput, latency and hot-load time.

Starts a server on a random backbone saved to a temporary file, with synthetic classify adapters in a
temporary store, then:

- load: a closed-loop generator (fixed concurrency, fixed duration) mixing 1, 8 and 64 tasks; reports
  images/s, p50/p99 latency, errors by status, and the end-to-end throughput as a fraction of the
  engine's own (images per second of engine batch time, from the server's /metrics over the phase);
- hot-load: upload a new version of a task and time until the first request served by it (the
  headline switch cost), and a cold pull of a stored version after an unload;
- memory: device bytes per resident adapter, from the admin listing.

    python bench/serve_bench.py                   # CPU: Swin-T, max batch 8, 10 s per phase
    python bench/serve_bench.py --device cuda     # GPU: Swin-B, max batch 64, 20 s per phase
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import Counter

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from monaserve.adapters import Backbone
from monaserve.adapters.synthetic import random_package
from monaserve.server.store import AdapterStore
from monaserve.testing import TOKEN, ServerProcess, image_bytes

from common import percentile, print_table, random_backbone_file, scratch_folder, write_result

JPEG = {"content-type": "image/jpeg"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None, help="default: Swin-B on CUDA, Swin-T on the CPU")
    parser.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default 64 / 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 2x max batch)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load phase (default 20 / 10)")
    parser.add_argument("--tasks", default="1,8,64", help="task counts to mix, comma-separated")
    parser.add_argument("--hot-loads", type=int, default=10, help="uploads timed in the hot-load phase")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("swin_base_patch4_window7_224" if cuda else "swin_tiny_patch4_window7_224")
    args.max_batch = args.max_batch or (64 if cuda else 8)
    args.concurrency = args.concurrency or 2 * args.max_batch
    args.duration = args.duration or (20.0 if cuda else 10.0)
    args.tasks = [int(t) for t in args.tasks.split(",")]
    return args


def engine_counters(client: httpx.Client) -> dict[str, float]:
    """Images batched and engine seconds so far, from the server's Prometheus metrics."""
    wanted = {"monaserve_batch_size_sum": "images", "monaserve_batch_size_count": "batches", "monaserve_batch_seconds_sum": "seconds"}
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] = sample.value
    return found


def load_phase(url: str, tasks: list[str], image: bytes, concurrency: int, duration: float) -> dict:
    """Closed loop: `concurrency` workers, each sending its next request when the last one returns."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def worker(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            i = offset
            while time.monotonic() < deadline:
                task = tasks[i % len(tasks)]
                i += concurrency
                start = time.perf_counter()
                try:
                    status = client.post(f"/v1/tasks/{task}/classify", content=image, headers=JPEG).status_code
                except httpx.TransportError:
                    status = 0
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(elapsed)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "requests": sum(statuses.values()),
        "ok": statuses[200],
        "errors": {str(code): n for code, n in statuses.items() if code != 200},
        "images_per_s": statuses[200] / wall,
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
    }


def served_version(client: httpx.Client, task: str, image: bytes) -> int:
    """The adapter version that served one classify request."""
    response = client.post(f"/v1/tasks/{task}/classify", content=image, headers=JPEG)
    response.raise_for_status()
    return response.json()["version"]


def hot_loads(admin: httpx.Client, store: AdapterStore, backbone: Backbone, image: bytes, count: int) -> dict:
    """Upload versions 1..count of a fresh task, polling until a request is served by each; then load
    versions count+1..2count that appeared in the store (local disk) through the admin load call."""
    payloads = [random_package(backbone, "hot", seed=1000 + v, version=v).to_bytes() for v in range(1, count + 1)]
    upload_ms, served_ms = [], []
    for version, payload in enumerate(payloads, start=1):
        start = time.perf_counter()
        admin.put("/v1/adapters/hot", content=payload).raise_for_status()
        upload_ms.append(1e3 * (time.perf_counter() - start))
        while served_version(admin, "hot", image) != version:
            pass
        served_ms.append(1e3 * (time.perf_counter() - start))
    disk_ms = []
    for version in range(count + 1, 2 * count + 1):  # as if another replica had stored them
        store.write("hot", version, random_package(backbone, "hot", seed=1000 + version, version=version).to_bytes())
        start = time.perf_counter()
        admin.post("/v1/adapters/hot/load", json={"version": version}).raise_for_status()
        disk_ms.append(1e3 * (time.perf_counter() - start))
    return {
        "package_bytes": len(payloads[0]),
        "upload_to_served_ms": {"p50": statistics.median(served_ms), "max": max(served_ms)},
        "upload_round_trip_ms": {"p50": statistics.median(upload_ms), "max": max(upload_ms)},
        "load_from_store_ms": {"p50": statistics.median(disk_ms), "max": max(disk_ms)},
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    workdir = scratch_folder("monaserve-bench-")
    weights = workdir / "backbone.safetensors"
    backbone = random_backbone_file(args.backbone, weights)
    store = AdapterStore(workdir / "store")
    names = [f"bench-{i}" for i in range(max(args.tasks))]
    for i, name in enumerate(names):
        store.write(name, 1, random_package(backbone, name, seed=i).to_bytes())
    image = image_bytes(0, size=(224, 224))
    server = ServerProcess(
        weights,
        workdir / "store",
        "--backbone",
        args.backbone,
        "--device",
        args.device,
        "--gpu-slots",
        str(len(names) + 1),
        "--max-batch",
        str(args.max_batch),
        "--preload",
        "all",
        "--max-queue",
        str(4 * args.concurrency),
        "--log-level",
        "warning",
        env={"MONASERVE_ADMIN_TOKEN": TOKEN},
        log=workdir / "server.log",
    )
    with server, server.client() as admin:
        phases = []
        for count in args.tasks:
            before = engine_counters(admin)
            phase = load_phase(server.url, names[:count], image, args.concurrency, args.duration)
            after = engine_counters(admin)
            images, seconds = (after[k] - before[k] for k in ("images", "seconds"))
            phase |= {
                "tasks": count,
                "mean_batch": images / (after["batches"] - before["batches"]),
                "engine_images_per_s": images / seconds,
            }
            phase["end_to_end_fraction"] = phase["images_per_s"] / phase["engine_images_per_s"]
            phases.append(phase)
        listing = admin.get("/v1/adapters").json()["device"]
        hot = hot_loads(admin, store, backbone, image, args.hot_loads)
    memory = {"resident_bytes": listing["resident_bytes"], "slots_used": listing["slots_used"]}
    memory["bytes_per_adapter"] = memory["resident_bytes"] / memory["slots_used"]

    print(f"{args.backbone} on {args.device}, max batch {args.max_batch}, {args.concurrency} in flight, {args.duration:.0f} s per phase")
    print_table(
        ["tasks", "requests", "errors", "images/s", "p50 ms", "p99 ms", "mean batch", "engine images/s", "end to end / engine"],
        [
            [
                p["tasks"],
                p["requests"],
                p["errors"] or "none",
                f"{p['images_per_s']:.1f}",
                f"{p['p50_ms']:.0f}",
                f"{p['p99_ms']:.0f}",
                f"{p['mean_batch']:.1f}",
                f"{p['engine_images_per_s']:.1f}",
                f"{p['end_to_end_fraction']:.2f}",
            ]
            for p in phases
        ],
    )
    print()
    print_table(
        ["hot-load", "p50 ms", "max ms"],
        [
            [label, f"{hot[key]['p50']:.0f}", f"{hot[key]['max']:.0f}"]
            for label, key in [
                ("upload -> first request served by it", "upload_to_served_ms"),
                ("upload round trip (validate, load, store, switch)", "upload_round_trip_ms"),
                ("load a new version from the store (local disk)", "load_from_store_ms"),
            ]
        ],
    )
    print(
        f"\npackage {hot['package_bytes'] / 2**20:.1f} MiB; "
        f"{memory['bytes_per_adapter'] / 2**20:.2f} MiB per resident adapter on {args.device}"
    )
    result = {
        "backbone": args.backbone,
        "max_batch": args.max_batch,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "phases": phases,
        "hot_load": hot,
        "memory": memory,
    }
    print(f"wrote {write_result('serve', device, result)}")


if __name__ == "__main__":
    main()
