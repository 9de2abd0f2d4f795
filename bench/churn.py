"""Load with adapter churn, and a memory soak, against a real `monaserve serve` on 127.0.0.1.

Serves N synthetic tasks (classify, detect and segment, at a small input size so a CPU keeps the
queue busy) while, at the same time:

- `--concurrency` closed-loop clients send 1 or 2 images to random tasks, a fifth of them pinned to a
  version that exists;
- an admin loop uploads new versions of random tasks, and unloads other tasks then loads them back;
- a sampler reads the server's RSS, device memory and queue depth with the count of answers so far.

Every answer is checked against what the admin loop did. A 200 must carry a version that existed: the
pinned one, or for an unpinned request one no older than the newest upload answered before the request
was sent and no newer than the newest upload sent before the answer came, and never one for a task that
was unloaded the whole time. For classify tasks each image's scores must also equal what that version
gives the image on its own (no torn or mixed weights). A 404 `task_unloaded`, pinned or not, must overlap an
unload-to-reload window of its task, and a 503 `overloaded` is the defined answer to a full queue
(`--max-queue` is set below what the clients can have waiting; they honour Retry-After).
Anything else is a failure. Afterwards the catalog must list every uploaded version and serve the
newest. Memory: the least-squares slope of RSS over answers after a warm-up.

    python bench/churn.py                                   # 60 s, 20 tasks, 10k requests at least
    python bench/churn.py --duration 20 --min-requests 0    # a quick look
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from monaserve.adapters import Backbone, InputSpec
from monaserve.adapters.synthetic import random_package
from monaserve.testing import TOKEN, ServerProcess, image_bytes

from common import percentile, print_table, random_backbone_file, scratch_folder, write_result

IMAGES = [image_bytes(seed, size=(40 + 8 * seed, 36)) for seed in range(4)]
LABELS = 4
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--input-size", type=int, default=32, help="square input side of every task (multiple of 32)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load, at least")
    parser.add_argument("--min-requests", type=int, default=10_000, help="keep going past --duration until this many")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="stop here even short of --min-requests")
    parser.add_argument("--concurrency", type=int, default=24, help="clients with a request in flight")
    parser.add_argument("--churn-interval", type=float, default=0.3, help="seconds between admin actions")
    parser.add_argument("--reload-after", type=float, default=0.6, help="seconds a task stays unloaded")
    parser.add_argument("--gpu-slots", type=int, default=24, help="room for every task and some new versions; old ones churn out")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16, help="below what the clients can queue: overload 503s too")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of answers left out of the memory slope")
    return parser.parse_args(argv)


def task_kind(index: int) -> str:
    return "detect" if index % 7 == 5 else "segment" if index % 7 == 6 else "classify"


@dataclass
class History:
    """What the admin loop did to one task: uploads as (version, sent, answered), and unloads as
    [unload sent, unload answered, reload sent, reload answered] (infinite until they happen)."""

    kind: str
    uploads: list[tuple[int, float, float]] = field(default_factory=lambda: [(1, 0.0, 0.0)])
    unloads: list[list[float]] = field(default_factory=list)

    @property
    def versions(self) -> list[int]:
        return [version for version, _, _ in self.uploads]


@dataclass
class Answer:
    """One inference request and what came back."""

    task: str
    pinned: int | None
    images: list[int]
    sent: float
    received: float
    status: int
    code: str = ""
    version: int | None = None
    scores: list[dict[int, float]] | None = None


def send(client: httpx.Client, task: str, kind: str, images: list[int], version: int | None) -> httpx.Response:
    params = {"top_k": LABELS} if kind == "classify" else {}
    if version is not None:
        params["version"] = version
    files = [("image", (f"{i}.jpg", IMAGES[i], "image/jpeg")) for i in images]
    return client.post(f"/v1/tasks/{task}/{kind}", files=files, params=params)


def read_scores(body: dict) -> list[dict[int, float]]:
    return [{item["index"]: item["score"] for item in result["top"]} for result in body["results"]]


def client_loop(url: str, history: dict[str, History], answers: list[Answer], stop: threading.Event, seed: int) -> None:
    """Closed loop: the next request goes as soon as the last one is answered."""
    rng = random.Random(seed)
    tasks = sorted(history)
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            task = rng.choice(tasks)
            kind = history[task].kind
            images = rng.sample(range(len(IMAGES)), rng.choice((1, 2)))
            pinned = rng.choice(history[task].versions) if rng.random() < 0.2 else None
            sent = time.monotonic()
            try:
                response = send(client, task, kind, images, pinned)
            except httpx.TransportError as exc:
                answers.append(Answer(task, pinned, images, sent, time.monotonic(), 0, type(exc).__name__))
                continue
            answer = Answer(task, pinned, images, sent, time.monotonic(), response.status_code)
            try:
                body = response.json()
                if response.status_code == 200:
                    answer.version = body["version"]
                    answer.scores = read_scores(body) if kind == "classify" else None
                    if len(body["results"]) != len(images):
                        answer.code = f"{len(body['results'])} results for {len(images)} images"
                else:
                    answer.code = body["error"]
            except (ValueError, KeyError, TypeError) as exc:  # a body not as documented is a failure too
                answer.code = f"unreadable answer ({type(exc).__name__}: {exc})"
            answers.append(answer)
            if response.status_code == 503:  # as a polite client does: wait as told, then send again
                time.sleep(float(response.headers.get("Retry-After", 1)))


def churn_loop(admin: httpx.Client, backbone: Backbone, history: dict[str, History], args, stop: threading.Event) -> Counter:
    """Upload new versions and unload/reload tasks until `stop`, then reload what is still unloaded."""
    rng = random.Random(0)
    done: Counter[str] = Counter()
    unloaded: dict[str, float] = {}  # task -> when to load it back

    def call(action: str, method: str, path: str, expect: int, **kwargs) -> tuple[float, float] | None:
        sent = time.monotonic()
        try:
            status = admin.request(method, path, **kwargs).status_code
        except httpx.TransportError:
            status = 0
        done[action if status == expect else f"{action} failed ({status})"] += 1
        return (sent, time.monotonic()) if status == expect else None

    def reload(task: str) -> None:
        timing = call("reload", "POST", f"/v1/adapters/{task}/load", 200)
        if timing is not None:
            history[task].unloads[-1][2:] = timing
            del unloaded[task]

    while not stop.wait(args.churn_interval):
        for task in [t for t, due in unloaded.items() if due <= time.monotonic()]:
            reload(task)
        task = rng.choice([t for t in sorted(history) if t not in unloaded])  # uploads re-enable: not those
        if rng.random() < 0.6:
            entry = history[task]
            version = max(entry.versions) + 1
            index = int(task.rsplit("-", 1)[1])
            package = random_package(
                backbone,
                task,
                seed=1000 * index + version,
                num_labels=LABELS,
                version=version,
                kind=entry.kind,
                input=InputSpec(size=(args.input_size, args.input_size)),
            )
            timing = call("upload", "PUT", f"/v1/adapters/{task}", 201, content=package.to_bytes())
            if timing is not None:
                entry.uploads.append((version, *timing))
        else:
            timing = call("unload", "DELETE", f"/v1/adapters/{task}", 200)
            if timing is not None:
                history[task].unloads.append([*timing, float("inf"), float("inf")])
                unloaded[task] = time.monotonic() + args.reload_after
    for task in list(unloaded):
        reload(task)
    return done


def problem(answer: Answer, entry: History) -> str | None:
    """Why `answer` is not one the server may give, given what the admin loop did; None if it may."""
    if answer.status == 200:
        if answer.code:
            return answer.code
        if any(unloaded <= answer.sent and answer.received <= reload for _, unloaded, reload, _ in entry.unloads):
            return "served while the task was unloaded"
        if answer.pinned is not None:
            return None if answer.version == answer.pinned else f"pinned v{answer.pinned}, served v{answer.version}"
        oldest = max(v for v, _, answered in entry.uploads if answered <= answer.sent)
        newest = max(v for v, sent, _ in entry.uploads if sent <= answer.received)
        if oldest <= answer.version <= newest:
            return None
        return f"served v{answer.version}; only v{oldest}..v{newest} existed and were served meanwhile"
    if answer.status == 404 and answer.code == "task_unloaded":  # pinned requests too: an unloaded task serves no version
        if any(unload <= answer.received and reloaded >= answer.sent for unload, _, _, reloaded in entry.unloads):
            return None
        return "task_unloaded outside any unload window"
    if answer.status == 503 and answer.code == "overloaded":
        return None
    return f"{answer.status} {answer.code}"


def torn_answers(admin: httpx.Client, answers: list[Answer], tolerance: float) -> tuple[int, int]:
    """Ask each (task, version) seen in a classify answer for all images pinned, in one request; count
    answers whose scores differ from those. Returns (versions checked, mismatching answers)."""
    seen = sorted({(a.task, a.version) for a in answers if a.scores is not None and a.code == ""})
    reference = {}
    for task, version in seen:
        response = send(admin, task, "classify", list(range(len(IMAGES))), version)
        response.raise_for_status()
        reference[task, version] = read_scores(response.json())
    mismatches = 0
    for a in answers:
        if a.scores is None or a.code:
            continue
        expected = [reference[a.task, a.version][i] for i in a.images]
        if any(got.keys() != want.keys() or any(abs(got[k] - want[k]) > tolerance for k in got) for got, want in zip(a.scores, expected)):
            mismatches += 1
    return len(seen), mismatches


def catalog_problems(admin: httpx.Client, history: dict[str, History]) -> list[str]:
    """Differences between the server's catalog and what was uploaded (all enabled, newest served)."""
    listed = {t["name"]: t for t in admin.get("/v1/adapters").json()["tasks"]}
    problems = []
    for task, entry in sorted(history.items()):
        view = listed.get(task)
        if view is None:
            problems.append(f"{task}: missing")
        elif not view["enabled"] or view["serving_version"] != max(entry.versions):
            problems.append(f"{task}: enabled={view['enabled']} serving v{view['serving_version']}, newest v{max(entry.versions)}")
        elif sorted(v["version"] for v in view["versions"]) != entry.versions:
            problems.append(f"{task}: versions {[v['version'] for v in view['versions']]} != uploaded {entry.versions}")
    return problems


def gauges(client: httpx.Client, names: set[str]) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        found |= {s.name: s.value for s in family.samples if s.name in names}
    return found


def sample_memory(server: ServerProcess, client: httpx.Client, answers: list[Answer], samples: list[dict], stop: threading.Event) -> None:
    """Every half second: answers so far, server RSS, device memory and queue depth."""
    while not stop.wait(0.5):
        values = gauges(client, {"monaserve_device_memory_bytes", "monaserve_queue_depth"})
        samples.append(
            {
                "answers": len(answers),
                "rss": server.rss_bytes(),
                "device": values.get("monaserve_device_memory_bytes", 0.0),
                "queue": values.get("monaserve_queue_depth", 0.0),
            }
        )


def slope_per_10k(samples: list[dict], key: str) -> float:
    """Least-squares growth of `key` in MiB per 10,000 answers."""
    xs = [s["answers"] for s in samples]
    ys = [s[key] / MiB for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return 10_000 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def memory_report(samples: list[dict], warmup: float) -> dict:
    total = samples[-1]["answers"]
    steady = [s for s in samples if s["answers"] >= warmup * total] or samples[-2:]
    return {
        "samples": len(samples),
        "warmup_answers": steady[0]["answers"],
        "rss_mib": {
            k: round(v / MiB, 1)
            for k, v in (
                ("start", samples[0]["rss"]),
                ("after_warmup", steady[0]["rss"]),
                ("end", samples[-1]["rss"]),
                ("max", max(s["rss"] for s in samples)),
            )
        },
        "rss_slope_mib_per_10k": round(slope_per_10k(steady, "rss"), 2),
        "device_mib": {"after_warmup": round(steady[0]["device"] / MiB, 1), "end": round(samples[-1]["device"] / MiB, 1)},
        "device_slope_mib_per_10k": round(slope_per_10k(steady, "device"), 2),
        "rss_trajectory_mib": [[s["answers"], round(s["rss"] / MiB)] for s in samples[:: max(1, len(samples) // 10)]],
        "queue_depth": {"mean": round(sum(s["queue"] for s in samples) / len(samples), 1), "max": max(s["queue"] for s in samples)},
    }


def make_server(args, workdir: Path) -> tuple[ServerProcess, Backbone, dict[str, History]]:
    weights = workdir / "backbone.safetensors"
    backbone = random_backbone_file(args.backbone, weights)
    history = {}
    for index in range(args.tasks):
        name, kind = f"churn-{index:02d}", task_kind(index)
        package = random_package(
            backbone, name, seed=1000 * index + 1, num_labels=LABELS, kind=kind, input=InputSpec(size=(args.input_size,) * 2)
        )
        package.save(workdir / "store" / name / "1.safetensors")
        history[name] = History(kind)
    server = ServerProcess(
        weights,
        workdir / "store",
        "--backbone",
        args.backbone,
        "--device",
        args.device,
        "--gpu-slots",
        str(args.gpu_slots),
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(args.max_queue),
        "--cpu-cache-mb",
        "64",
        "--catalog-refresh-s",
        "2",
        "--log-level",
        "warning",
        env={"MONASERVE_ADMIN_TOKEN": TOKEN},
        log=workdir / "server.log",
    )
    return server, backbone, history


def run(args) -> dict:
    workdir = scratch_folder("monaserve-churn-")
    server, backbone, history = make_server(args, workdir)
    answers: list[Answer] = []
    samples: list[dict] = []
    stop_load, stop_churn, stop_sampling = threading.Event(), threading.Event(), threading.Event()
    with server, server.client() as admin, server.client() as probe:
        clients = [threading.Thread(target=client_loop, args=(server.url, history, answers, stop_load, k)) for k in range(args.concurrency)]
        sampler = threading.Thread(target=sample_memory, args=(server, probe, answers, samples, stop_sampling))
        admin_actions: Counter = Counter()
        churner = threading.Thread(target=lambda: admin_actions.update(churn_loop(admin, backbone, history, args, stop_churn)))
        started = time.monotonic()
        for thread in [sampler, churner, *clients]:
            thread.start()
        while (time.monotonic() - started < args.duration or len(answers) < args.min_requests) and (
            time.monotonic() - started < args.time_limit
        ):
            time.sleep(0.2)
        stop_churn.set()
        churner.join()  # every unloaded task is back before the load stops
        stop_load.set()
        for thread in clients:
            thread.join()
        elapsed = time.monotonic() - started
        stop_sampling.set()
        sampler.join()
        tolerance = 1e-3 if args.device == "cpu" else 2e-2  # reduced precision on a GPU: batches differ slightly
        versions_checked, torn = torn_answers(admin, answers, tolerance)
        catalog = catalog_problems(admin, history)
    problems = [(a, p) for a in answers if (p := problem(a, history[a.task]))]
    latencies = [a.received - a.sent for a in answers if a.status == 200]
    return {
        "config": vars(args),
        "duration_s": round(elapsed, 1),
        "requests": len(answers),
        "requests_per_s": round(len(answers) / elapsed, 1),
        "images": sum(len(a.images) for a in answers if a.status == 200),
        "answers": dict(Counter(f"{a.status} {a.code}".strip() for a in answers).most_common()),
        "latency_ms": {"p50": round(1e3 * percentile(latencies, 0.5), 1), "p99": round(1e3 * percentile(latencies, 0.99), 1)},
        "failures": len(problems),
        "failure_examples": [f"{a.task} {p}" for a, p in problems[:10]],
        "admin": dict(admin_actions),
        "versions_checked": versions_checked,
        "torn_answers": torn,
        "catalog_problems": catalog,
        "memory": memory_report(samples, args.warmup),
    }


def main() -> None:
    args = parse_args()
    result = run(args)
    memory = result["memory"]
    print(f"{args.tasks} tasks at {args.input_size}px on {args.device}, {args.concurrency} clients, {result['duration_s']} s")
    print_table(
        ["requests", "req/s", "p50 ms", "p99 ms", "answers", "failures", "torn", "admin actions"],
        [
            [
                result["requests"],
                result["requests_per_s"],
                result["latency_ms"]["p50"],
                result["latency_ms"]["p99"],
                ", ".join(f"{k}: {v}" for k, v in result["answers"].items()),
                result["failures"],
                result["torn_answers"],
                ", ".join(f"{k}: {v}" for k, v in result["admin"].items()),
            ]
        ],
    )
    print()
    print_table(
        ["RSS after warm-up MiB", "RSS end MiB", "RSS max MiB", "RSS slope MiB/10k", "device slope MiB/10k", "queue mean/max"],
        [
            [
                memory["rss_mib"]["after_warmup"],
                memory["rss_mib"]["end"],
                memory["rss_mib"]["max"],
                memory["rss_slope_mib_per_10k"],
                memory["device_slope_mib_per_10k"],
                f"{memory['queue_depth']['mean']}/{memory['queue_depth']['max']:.0f}",
            ]
        ],
    )
    for line in result["failure_examples"] + result["catalog_problems"]:
        print("problem:", line)
    print("written to", write_result("churn", torch.device(args.device), result))


if __name__ == "__main__":
    main()
