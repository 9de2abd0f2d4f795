"""A hostile client's attacks on real `monaserve serve` processes on 127.0.0.1, each measured against its own baseline.

Each scenario starts fresh servers (a random Swin-T, tasks at 64 px so 2 CPU cores keep up) and reports
what the attack did to the server and to well-behaved clients of the same run:

- fleet:         2 replicas behind nginx (deploy/nginx/nginx.conf); attackers send an 89-byte PNG
                 (an empty iCCP chunk after IDAT) at 20, then 200 requests/s while 4 clients send
                 valid requests: the normal clients' answers by status. `--fault internal` makes the
                 attackers trigger an injected exception instead (OIP request parsing patched to
                 raise, by monaserve.testing.faults).
- amplification: one small segment request that lists the `mask` output 50 times (OIP, JSON), and
                 64 noise JPEGs with per-class RLE (v1): response bytes over request bytes, server
                 memory, and the worst /health/live latency meanwhile.
- decode:        3 attackers sending 16 8000x5000 PNGs (126 KB each) per request, then 2 per request,
                 and the same with JPEGs, while 4 clients send small images: their p50 against the
                 same clients with no attack.
- memory:        8 concurrent 58 MiB JSON requests: server RSS growth and the answers.
- slowloris:     8000 half-sent requests (headers or bodies): descriptors the server holds after
                 30 s; how long a header and a body sent at 1 byte/s keep a connection.
- descriptors:   a server with 400 file descriptors and 500 connections against it: log bytes
                 written in 15 s, and /health/live once the connections close.

    python bench/attack.py                              # every scenario (about 6 minutes on 2 cores)
    python bench/attack.py --only fleet,decode --label before
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from monaserve.adapters import InputSpec
from monaserve.adapters.synthetic import random_package
from monaserve.testing import FAULTS, TOKEN, Nginx, ServerProcess, find_tool, free_port, image_bytes

from common import percentile, print_table, random_backbone_file, scratch_folder, write_result

NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf"
JPEG = {"content-type": "image/jpeg"}
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="the servers' --device")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios of {', '.join(SCENARIOS)}")
    parser.add_argument("--label", default="", help="names the results file: attack-<label>-<device>.json")
    parser.add_argument("--fault", choices=["iccp", "internal"], default="iccp", help="fleet: what the attackers trigger")
    parser.add_argument("--duration", type=float, default=30.0, help="fleet: seconds of attack")
    parser.add_argument("--attack-rates", default="20,200", help="fleet: attack requests per second (2 attackers together), one phase each")
    parser.add_argument("--phase-s", type=float, default=12.0, help="decode: seconds per phase")
    parser.add_argument("--connections", type=int, default=8000, help="slowloris: half-sent requests")
    return parser.parse_args(argv)


# ---- payloads ------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def empty_iccp_png(side: int = 6) -> bytes:
    """A valid PNG with an empty iCCP chunk after IDAT: Pillow raises IndexError while loading it."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    end = png.rindex(b"IEND") - 4
    return png[:end] + png_chunk(b"iCCP", b"") + png[end:]


def flat_image(width: int, height: int, fmt: str) -> bytes:
    """A large image that compresses to almost nothing (a gradient), so it is cheap to send, dear to decode."""
    row = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.repeat(np.repeat(row[None, :, None], height, axis=0), 3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 50} if fmt == "JPEG" else {"optimize": True}))
    return buffer.getvalue()


def noise_png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---- servers -------------------------------------------------------------------------------------


class Lab:
    """A work folder with the random backbone's weights and a store of tasks, and servers over it."""

    TASKS = {"cls-0": "classify", "cls-1": "classify", "cls-2": "classify", "cls-3": "classify", "seg-0": "segment", "seg-1": "segment"}

    def __init__(self, device: str) -> None:
        self.device = device
        self.dir = scratch_folder("monaserve-attack-")
        self.weights = self.dir / "backbone.safetensors"
        backbone = random_backbone_file("swin_tiny_patch4_window7_224", self.weights)
        self.store = self.dir / "store"
        for i, (name, kind) in enumerate(self.TASKS.items()):
            package = random_package(backbone, name, seed=i + 1, kind=kind, num_labels=4, input=InputSpec(size=(64, 64)))
            package.save(self.store / name / "1.safetensors")
        self._count = 0

    def server(self, *args: str, launcher: list[str] | None = None, port: int | None = None, env: dict | None = None) -> ServerProcess:
        self._count += 1
        return ServerProcess(
            self.weights,
            self.store,
            "--device",
            self.device,
            "--log-level",
            "warning",
            *args,
            env={"MONASERVE_ADMIN_TOKEN": TOKEN, **(env or {})},
            log=self.dir / f"server-{self._count}.log",
            port=port,
            launcher=launcher,
        )


class Sampler:
    """Samples a server's RSS and the latency of GET /health/live every 50 ms, in a thread."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.rss: list[int] = []
        self.live_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while not self._stop.is_set():
                self.rss.append(self.server.rss_bytes())
                started = time.monotonic()
                try:
                    client.get("/health/live")
                except httpx.TransportError:
                    pass
                self.live_s.append(time.monotonic() - started)
                self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self.rss.append(self.server.rss_bytes())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rss.append(self.server.rss_bytes())


def clients(
    url: str, send: Callable[[httpx.Client, int], httpx.Response], count: int, stop: threading.Event, rate: float | None = None
) -> list[tuple[int, float]]:
    """`count` threads calling `send` until `stop`, back to back or, with `rate`, that many requests a
    second together; (status, seconds) of each answer (status 0: a transport error)."""
    answers: list[tuple[int, float]] = []
    lock = threading.Lock()

    def loop(k: int) -> None:
        next_at, i = time.monotonic(), k
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status = send(client, i).status_code
                except httpx.TransportError:
                    status = 0
                with lock:
                    answers.append((status, time.monotonic() - started))
                i += count
                if rate is not None:
                    next_at += count / rate
                    stop.wait(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return answers


def run_for(seconds: float, *loads: Callable[[threading.Event], object]) -> list:
    """Run each load in a thread for `seconds`; their results in order."""
    stop = threading.Event()
    results: list = [None] * len(loads)

    def runner(i: int) -> None:
        results[i] = loads[i](stop)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(loads))]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return results


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(seconds: float) -> float:
    return round(1e3 * seconds, 1)


def statuses_of(answers: list[tuple[int, float]]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(status for status, _ in answers).items())}


# ---- scenarios -----------------------------------------------------------------------------------


def fleet(lab: Lab, args) -> dict:
    """Attackers at 20 requests/s against 2 replicas behind nginx; 4 normal clients meanwhile."""
    launcher = [*FAULTS, "monaserve.server.oip:parse_request"] if args.fault == "internal" else None
    ports = [free_port(), free_port()]
    replicas = [lab.server("--replica-id", f"replica-{i}", port=ports[i], launcher=launcher) for i in range(2)]
    image = image_bytes(0, size=(96, 96))
    payload = empty_iccp_png()
    classify = [t for t, kind in Lab.TASKS.items() if kind == "classify"]

    def normal(client: httpx.Client, i: int) -> httpx.Response:
        return client.post(f"/v1/tasks/{classify[i % len(classify)]}/classify", content=image, headers=JPEG)

    def attack(client: httpx.Client, i: int) -> httpx.Response:
        if args.fault == "internal":  # any request to /v2/.../infer raises inside the server
            return client.post(f"/v2/models/{classify[i % len(classify)]}/infer", json={"inputs": []})
        return client.post(f"/v1/tasks/{classify[i % len(classify)]}/classify", content=payload, headers={"content-type": "image/png"})

    phases, rows = [], []
    try:
        for replica in replicas:
            replica.wait_ready(180)
        workdir = lab.dir / f"nginx-{free_port()}"
        workdir.mkdir()
        nginx_binary = find_tool("nginx")
        if nginx_binary is None:
            raise SystemExit("the fleet attack needs nginx (apt-get install nginx)")
        with Nginx(ports, workdir, free_port(), config=NGINX_CONF, binary=nginx_binary) as nginx:
            with httpx.Client(base_url=nginx.url, timeout=60) as client:
                for i in range(len(classify)):  # warm every task's slot on the replica nginx hashes it to
                    normal(client, i)
            for rate in [float(r) for r in args.attack_rates.split(",")]:
                time.sleep(11)  # past nginx's fail_timeout (10 s): each phase starts with every replica up
                logged = (workdir / "error.log").read_text().count("upstream")
                good, bad = run_for(
                    args.duration,
                    lambda stop: clients(nginx.url, normal, 4, stop),
                    lambda stop, rate=rate: clients(nginx.url, attack, 2, stop, rate),
                )
                failed = sum(1 for status, _ in good if status != 200)
                phases.append(
                    {
                        "attack_rate": rate,
                        "attack_answers": statuses_of(bad),
                        "normal_requests": len(good),
                        "normal_answers": statuses_of(good),
                        "normal_failed": failed,
                        "nginx_upstream_errors_logged": (workdir / "error.log").read_text().count("upstream") - logged,
                    }
                )
                attack_name = "injected exception" if args.fault == "internal" else f"iCCP PNG of {len(payload)} B"
                rows.append(
                    [
                        "fleet",
                        f"{attack_name} x {rate:g}/s, {args.duration:g} s",
                        f"{failed} of {len(good)} normal requests failed",
                        ", ".join(f"{k}: {v}" for k, v in statuses_of(good).items()),
                    ]
                )
    finally:
        for replica in replicas:
            replica.stop()
    return {"fault": args.fault, "payload_bytes": len(payload), "phases": phases, "table": rows}


def amplification(lab: Lab, args) -> dict:
    """Response bytes per request byte: duplicated OIP outputs, and many masks with RLE on v1."""
    smooth = flat_image(1600, 1200, "JPEG")
    oip = json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(smooth).decode()]}],
            "outputs": [{"name": "mask"}] * 50,
        }
    ).encode()
    large = [flat_image(4000, 3000 + i, "JPEG") for i in range(8)]
    cases = {
        "oip: mask output listed 50 times": lambda c: c.post(
            "/v2/models/seg-0/infer", content=oip, headers={"content-type": "application/json"}
        ),
        "v1: 8 4000x3000 JPEGs, rle=true": lambda c: c.post(
            "/v1/tasks/seg-0/segment?rle=true", files=[("image", (f"{i}.jpg", d)) for i, d in enumerate(large)]
        ),
    }
    request_bytes = {"oip: mask output listed 50 times": len(oip), "v1: 8 4000x3000 JPEGs, rle=true": sum(map(len, large))}
    results, rows = {}, []
    with lab.server() as server, server.client(timeout=300) as client:
        for name, send in cases.items():
            send(client)  # warm: slots loaded, pools at their working size
            with Sampler(server) as sampler:
                before = server.rss_bytes()
                started = time.monotonic()
                response = send(client)
                seconds = time.monotonic() - started
            out = len(response.content)
            results[name] = {
                "status": response.status_code,
                "request_bytes": request_bytes[name],
                "response_bytes": out,
                "ratio": round(out / request_bytes[name], 1),
                "seconds": round(seconds, 2),
                "rss_growth_mib": round((max(sampler.rss) - before) / MiB, 1),
                "live_max_ms": ms(max(sampler.live_s, default=0.0)),
            }
            r = results[name]
            rows.append(
                [
                    "amplification",
                    name,
                    f"{r['status']}: {r['response_bytes'] / MiB:.1f} MiB answer ({r['ratio']}x), {r['seconds']} s",
                    f"RSS +{r['rss_growth_mib']} MiB, /health/live worst {r['live_max_ms']} ms",
                ]
            )
    return {"cases": results, "table": rows}


def decode(lab: Lab, args) -> dict:
    """Normal clients' p50 while attackers send costly-to-decode images, against the same clients alone."""
    small = image_bytes(1, size=(160, 120))
    payloads = {"PNG": flat_image(8000, 5000, "PNG"), "JPEG": flat_image(8000, 5000, "JPEG")}
    classify = [t for t, kind in Lab.TASKS.items() if kind == "classify"]

    def normal(client: httpx.Client, i: int) -> httpx.Response:
        return client.post(f"/v1/tasks/{classify[i % len(classify)]}/classify", content=small, headers=JPEG)

    def attacker(data: bytes, count: int, fmt: str) -> Callable[[httpx.Client, int], httpx.Response]:
        files = [("image", (f"{i}.{fmt.lower()}", data)) for i in range(count)]
        return lambda client, i: client.post(f"/v1/tasks/{classify[i % len(classify)]}/classify", files=files)

    phases, rows = [], []
    with lab.server() as server:
        run_for(2, lambda stop: clients(server.url, normal, 4, stop))  # warm
        baseline = run_for(args.phase_s, lambda stop: clients(server.url, normal, 4, stop))[0]
        base_p50 = percentile([s for status, s in baseline if status == 200], 0.5)
        phases.append({"attack": "none", "normal_p50_ms": ms(base_p50), "normal_answers": statuses_of(baseline)})
        for fmt, data in payloads.items():
            for count in (16, 2):
                server_cpu, client_cpu = cpu_seconds(server.process.pid), time.process_time()
                good, bad = run_for(
                    args.phase_s,
                    lambda stop: clients(server.url, normal, 4, stop),
                    lambda stop, data=data, count=count, fmt=fmt: clients(server.url, attacker(data, count, fmt), 3, stop),
                )
                p50 = percentile([s for status, s in good if status == 200], 0.5)
                phases.append(
                    {
                        "attack": f"3 clients x {count} {fmt} 8000x5000 ({len(data) // 1000} KB each) per request",
                        "normal_p50_ms": ms(p50),
                        "p50_ratio": round(p50 / base_p50, 2),
                        "normal_answers": statuses_of(good),
                        "attack_answers": statuses_of(bad),
                        "server_cpu_s": round(cpu_seconds(server.process.pid) - server_cpu, 1),
                        "load_generator_cpu_s": round(time.process_time() - client_cpu, 1),  # the same 2 cores
                    }
                )
                rows.append(
                    [
                        "decode",
                        phases[-1]["attack"],
                        f"normal p50 {ms(base_p50)} -> {ms(p50)} ms ({p50 / base_p50:.2f}x)",
                        "attack: " + ", ".join(f"{k}: {v}" for k, v in statuses_of(bad).items()),
                    ]
                )
    return {"phases": phases, "table": rows}


def memory(lab: Lab, args) -> dict:
    """Eight 58 MiB JSON requests at once: how much memory the server takes, and what it answers."""
    images = [noise_png(2100, 2400 + i) for i in range(3)]
    body = json.dumps({"images": [base64.b64encode(d).decode() for d in images]}).encode()
    answers: list[int] = []
    with lab.server() as server, server.client(timeout=300) as client:
        client.post("/v1/tasks/cls-0/classify", content=image_bytes(0), headers=JPEG)
        with Sampler(server) as sampler:
            before = server.rss_bytes()

            def send() -> None:
                with httpx.Client(base_url=server.url, timeout=300) as c:
                    answers.append(
                        c.post("/v1/tasks/cls-0/classify", content=body, headers={"content-type": "application/json"}).status_code
                    )

            threads = [threading.Thread(target=send) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    growth = (max(sampler.rss) - before) / MiB
    answered = dict(sorted(Counter(str(s) for s in answers).items()))
    return {
        "body_mib": round(len(body) / MiB, 1),
        "rss_growth_mib": round(growth, 1),
        "answers": answered,
        "table": [
            [
                "memory",
                f"8 concurrent {len(body) / MiB:.0f} MiB JSON requests",
                f"RSS +{growth:.0f} MiB",
                ", ".join(f"{k}: {v}" for k, v in answered.items()),
            ]
        ],
    }


def open_descriptors(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def half_sent(url_port: int, count: int) -> list[socket.socket]:
    """`count` connections, half stopped inside the headers and half inside a declared body."""
    sockets = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", url_port))
        if i % 2:
            s.sendall(
                b"POST /v1/tasks/cls-0/classify HTTP/1.1\r\nHost: a\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n0123456789"
            )
        else:
            s.sendall(b"POST /v1/tasks/cls-0/classify HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        sockets.append(s)
    return sockets


def trickle_lifetime(port: int, head: bytes, drip: bytes, limit_s: float) -> float | None:
    """Send `head`, then `drip` one byte a second: seconds until the server answers or closes (None: still open)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        s.settimeout(1.0)
        started = time.monotonic()
        for byte in drip:
            if time.monotonic() - started > limit_s:
                return None
            try:
                s.recv(65536)  # an answer (a 408) or the end of the stream: either way the server gave up on us
                return round(time.monotonic() - started, 1)
            except TimeoutError:
                pass
            except OSError:
                return round(time.monotonic() - started, 1)
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return round(time.monotonic() - started, 1)
    return None


def slowloris(lab: Lab, args) -> dict:
    """Half-sent requests: descriptors held after 30 s, and how long 1-byte/s senders are kept."""
    with lab.server() as server:
        port = server.port
        idle = open_descriptors(server)
        sockets = half_sent(port, args.connections)
        opened = open_descriptors(server)
        time.sleep(30)
        held = open_descriptors(server)
        started = time.monotonic()
        live = httpx.get(server.url + "/health/live", timeout=60).status_code
        live_s = time.monotonic() - started
        for s in sockets:
            s.close()
        limit = 60.0
        header = trickle_lifetime(port, b"GET /health/live HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200, limit)
        body = trickle_lifetime(
            port,
            b"POST /v1/tasks/cls-0/classify HTTP/1.1\r\nHost: a\r\nContent-Type: image/jpeg\r\nContent-Length: 500\r\n\r\n",
            b"x" * 500,
            limit,
        )

    def kept(seconds: float | None) -> str:
        return f"still open after {limit:g} s" if seconds is None else f"closed after {seconds} s"

    return {
        "connections": args.connections,
        "descriptors_idle": idle,
        "descriptors_after_connect": opened,
        "descriptors_after_30s": held,
        "live_status": live,
        "live_ms": ms(live_s),
        "header_at_1_byte_per_s": header,
        "body_at_1_byte_per_s": body,
        "table": [
            [
                "slowloris",
                f"{args.connections} half-sent requests",
                f"{held} descriptors held after 30 s (idle: {idle})",
                f"/health/live {live} in {ms(live_s)} ms",
            ],
            ["slowloris", "headers at 1 byte/s", kept(header), ""],
            ["slowloris", "a body at 1 byte/s", kept(body), ""],
        ],
    }


def descriptors(lab: Lab, args) -> dict:
    """A server at its descriptor limit: what it logs, and whether it answers once descriptors free up."""
    limit = 400
    server = lab.server(launcher=["prlimit", f"--nofile={limit}:{limit}"])
    with server:
        logged_before = server.log_path.stat().st_size
        sockets = []
        for _ in range(limit + 100):
            try:
                s = socket.create_connection(("127.0.0.1", server.port), timeout=2)
                s.sendall(b"GET /health/live HTTP/1.1\r\nHost: a\r\n")
                sockets.append(s)
            except OSError:
                break
        time.sleep(15)
        logged = server.log_path.stat().st_size - logged_before
        for s in sockets:
            s.close()
        started = time.monotonic()
        recovered = None
        while time.monotonic() - started < 30:
            try:
                if httpx.get(server.url + "/health/live", timeout=2).status_code == 200:
                    recovered = round(time.monotonic() - started, 2)
                    break
            except httpx.TransportError:
                time.sleep(0.2)
    return {
        "limit": limit,
        "connections": len(sockets),
        "log_bytes_in_15s": logged,
        "live_after_close_s": recovered,
        "table": [
            [
                "descriptors",
                f"{len(sockets)} connections against {limit} descriptors, 15 s",
                f"{logged / MiB:.2f} MiB of log",
                "/health/live " + ("never answered" if recovered is None else f"200 {recovered} s after they closed"),
            ]
        ],
    }


SCENARIOS: dict[str, Callable[[Lab, argparse.Namespace], dict]] = {
    "fleet": fleet,
    "amplification": amplification,
    "decode": decode,
    "memory": memory,
    "slowloris": slowloris,
    "descriptors": descriptors,
}


def main() -> None:
    args = parse_args()
    lab = Lab(args.device)
    results, rows = {}, []
    for name in args.only.split(","):
        started = time.monotonic()
        results[name] = SCENARIOS[name](lab, args)
        results[name]["wall_s"] = round(time.monotonic() - started, 1)
        rows += results[name].pop("table")
        print(f"{name}: done in {results[name]['wall_s']} s", file=sys.stderr, flush=True)
    print_table(["scenario", "attack", "effect", "also"], rows)
    kind = "attack" + (f"-{args.label}" if args.label else "")
    print("written to", write_result(kind, torch.device(args.device), {"config": vars(args), "scenarios": results, "table": rows}))


if __name__ == "__main__":
    main()
