"""Engine throughput: the plain backbone against Mona-adapted and mixed-task forwards, side by side.

Every variant runs the same random backbone weights in one process; rounds are interleaved (each round
times every variant once) and each variant reports its median images/s and its ratio to the plain
backbone. Variants:

- plain: the timm Swin with no adapters (the ceiling).
- reference: the paper's Mona module, unfolded, one task (what training runs).
- folded: one task through the engine's MonaBank (one dense run).
- mixed-T: T tasks in one batch, sorted by slot as the engine does (dense runs up to the bank's
  limit, gathered per-sample weights above it); mixed-T per-sample forces the gathered path.
- loop-T: T tasks as T sub-batches, one backbone pass each (how a server without per-sample adapter
  routing mixes tasks; the baseline that mixed-T must beat).

    python bench/engine_bench.py                       # CPU: Swin-T, batch 8
    python bench/engine_bench.py --device cuda         # GPU: Swin-B, batch 64, bf16, also compiled
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from monaserve.adapters import Backbone, Mona, SlotRouting, forward_pyramid, inject_mona
from monaserve.adapters.synthetic import random_package, randomize_
from monaserve.server.engine import Engine, default_dtype

from common import device_name, print_table, write_result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None, help="default: Swin-B on CUDA, Swin-T on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    parser.add_argument("--tasks", default=None, help="task counts to mix, comma-separated (default 8,64 / 2,8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20 on CUDA, 8 on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    parser.add_argument("--profile", default=None, metavar="VARIANT", help="profile one variant and print its top ops")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("swin_base_patch4_window7_224" if cuda else "swin_tiny_patch4_window7_224")
    args.batch = args.batch or (64 if cuda else 8)
    args.tasks = [int(t) for t in (args.tasks or ("8,64" if cuda else "2,8")).split(",")]
    args.rounds = args.rounds or (20 if cuda else 8)
    args.compile = cuda if args.compile is None else args.compile
    return args


class Variants:
    """The models under test, built from one random backbone, and a forward per variant name."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, batch: int, tasks: list[int]) -> None:
        self.device, self.batch, self.tasks = device, batch, tasks
        self.images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        self.plain = Backbone.load(name, "random").model.to(device, dtype).eval()
        reference = Backbone.load(name, "random")
        inject_mona(reference.model, lambda dim: randomize_(Mona(dim), seed=dim).eval())
        self.reference = reference.model.to(device, dtype).eval()
        backbone = Backbone.load(name, "random")
        self.engine = Engine(backbone, num_slots=max(tasks), device=device, dtype=dtype)
        for slot in range(max(tasks)):
            self.engine.install(slot, random_package(backbone, f"task-{slot}", seed=slot))
        self.forwards: dict[str, Callable[[], object]] = {
            "plain": lambda: forward_pyramid(self.plain, self.images),
            "reference": lambda: forward_pyramid(self.reference, self.images),
            "folded": self.mixed(1),
        }
        for t in tasks:
            self.forwards[f"mixed-{t}"] = self.mixed(t)
            self.forwards[f"mixed-{t} per-sample"] = self.mixed(t, dense_run_limit=0)
            self.forwards[f"loop-{t}"] = self.loop(t)

    def slots(self, tasks: int) -> list[int]:
        """`tasks` tasks spread evenly over the batch, sorted (the engine sorts every batch)."""
        return sorted(i % tasks for i in range(self.batch))

    def set_dense_run_limit(self, limit: int) -> None:
        for bank in self.engine.banks.values():
            bank.dense_run_limit = limit

    def mixed(self, tasks: int, dense_run_limit: int | None = None) -> Callable[[], object]:
        routing = SlotRouting.of(self.slots(tasks), self.device)
        default = next(iter(self.engine.banks.values())).dense_run_limit

        def forward() -> object:
            self.set_dense_run_limit(default if dense_run_limit is None else dense_run_limit)
            try:
                return forward_pyramid(self.engine.model, self.images, routing)
            finally:
                self.set_dense_run_limit(default)

        return forward

    def loop(self, tasks: int) -> Callable[[], object]:
        runs = SlotRouting.of(self.slots(tasks)).runs
        routings = [SlotRouting.of([run.slot] * (run.stop - run.start), self.device) for run in runs]

        def forward() -> list:
            return [forward_pyramid(self.engine.model, self.images[run.start : run.stop], routing) for run, routing in zip(runs, routings)]

        return forward

    def compiled(self) -> dict[str, Callable[[], object]]:
        """The plain, folded and mixed forwards under `torch.compile` (graphs specialise per routing)."""
        pyramid = torch.compile(forward_pyramid)
        out = {"plain compiled": lambda: pyramid(self.plain, self.images)}
        for tasks in [1, *self.tasks]:
            routing = SlotRouting.of(self.slots(tasks), self.device)
            name = "folded" if tasks == 1 else f"mixed-{tasks}"
            out[f"{name} compiled"] = lambda r=routing: pyramid(self.engine.model, self.images, r)
        return out


def time_variants(forwards: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per call of each forward, timing them round-robin after two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for round_index in range(rounds + 2):
        for name, forward in forwards.items():
            synchronize(device)
            start = time.perf_counter()
            forward()
            synchronize(device)
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(forward: Callable[[], object], device: torch.device, rows: int = 15) -> str:
    """The ops that take the time in `forward`, by self time on the device."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    forward()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            forward()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device)
    variants = Variants(args.backbone, device, dtype, args.batch, args.tasks)
    forwards = dict(variants.forwards)
    if args.compile:
        forwards |= variants.compiled()
    print(f"{args.backbone}, batch {args.batch}, {dtype}, {device_name(device)}; {args.rounds} interleaved rounds")
    seconds = time_variants(forwards, device, args.rounds)
    rows, records = [], []
    for name, s in seconds.items():
        baseline = seconds["plain compiled" if name.endswith("compiled") else "plain"]
        ratio = baseline / s
        rows.append([name, f"{args.batch / s:.1f}", f"{s * 1e3:.1f}", f"{ratio:.2f}x"])
        records.append({"variant": name, "images_per_s": args.batch / s, "ms_per_batch": s * 1e3, "ratio_to_plain": ratio})
    print_table(["variant", "images/s", "ms/batch", "vs plain"], rows)
    result = {"backbone": args.backbone, "batch": args.batch, "dtype": str(dtype), "rounds": args.rounds, "variants": records}
    if args.profile:
        table = profile(forwards[args.profile], device)
        print(f"\nprofile of {args.profile}:\n{table}")
        result["profile"] = {"variant": args.profile, "table": table}
    print(f"\nwrote {write_result('engine', device, result)}")


if __name__ == "__main__":
    main()
