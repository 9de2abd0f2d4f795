"""Engine throughput: the plain backbone against Mona-adapted and mixed-task forwards, side by side.

Every variant runs the same random backbone weights in one process; rounds are interleaved (each round
times every variant once) and each variant reports its median images/s, its ratio to the plain backbone
of the same mode and, for mixed batches, its ratio to one task. Variants:

- plain: the timm Swin with no adapters (the ceiling).
- reference: the paper's Mona module, unfolded, one task (what training runs).
- folded: one task through the engine's batched forward (`Engine.features`).
- mixed-T: T tasks in one batch, sorted by slot as the engine sorts it; the same graph as folded.
- loop-T: T tasks as T sub-batches, one backbone pass each (how a server without per-sample adapter
  routing mixes tasks; the baseline that mixed-T must beat).

With --compile, plain, folded and mixed-T also run compiled (the engine's own `compile`: fullgraph, one
graph per shape, CUDA graphs on CUDA), and the run reports how many graphs compiled after warm-up:
0 unless a task mix made the engine recompile. With --kernels torch,triton (the default on CUDA), folded
and mixed-T also run on the fused Triton kernel (`... triton`), with their ratio to the torch path.

    python bench/engine_bench.py                       # CPU: Swin-T, batch 8
    python bench/engine_bench.py --device cuda         # GPU: Swin-B, batch 64, bf16, also compiled
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from monaserve.adapters import Backbone, Mona, forward_pyramid, inject_mona
from monaserve.adapters.synthetic import random_package, randomize_
from monaserve.server.compile import compile_forward
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
    parser.add_argument("--kernels", default=None, help="Mona kernels to run, comma-separated (default torch,triton / torch)")
    parser.add_argument("--label", default="", help="names the result file: bench/results/engine-LABEL-<device>.json")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("swin_base_patch4_window7_224" if cuda else "swin_tiny_patch4_window7_224")
    args.batch = args.batch or (64 if cuda else 8)
    args.tasks = [int(t) for t in (args.tasks or ("8,64" if cuda else "2,8")).split(",")]
    args.rounds = args.rounds or (20 if cuda else 8)
    args.compile = cuda if args.compile is None else args.compile
    args.kernels = (args.kernels or ("torch,triton" if cuda else "torch")).split(",")
    return args


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Variants:
    """The models under test, built from one random backbone, and a forward per variant name."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.batch, self.tasks = device, args.batch, args.tasks
        self.images = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)
        self.plain = Backbone.load(args.backbone, "random").model.to(device, dtype).eval()
        reference = Backbone.load(args.backbone, "random")
        inject_mona(reference.model, lambda dim: randomize_(Mona(dim), seed=dim).eval())
        self.reference = reference.model.to(device, dtype).eval()
        modes = [(compiled, kernel) for kernel in args.kernels for compiled in ([False, True] if args.compile else [False])]
        self.engines = {mode: self.engine(args, device, dtype, *mode) for mode in modes}
        self.forwards: dict[str, Callable[[], object]] = {
            "plain": lambda: forward_pyramid(self.plain, self.images),
            "reference": lambda: forward_pyramid(self.reference, self.images),
        }
        if args.compile:
            plain = compile_forward(forward_pyramid, device, buckets=1)
            self.forwards["plain compiled"] = lambda: plain(self.plain, self.images)
        for (compiled, kernel), engine in self.engines.items():
            suffix = (" triton" if kernel == "triton" else "") + (" compiled" if compiled else "")
            for tasks in [1, *self.tasks]:
                name = "folded" if tasks == 1 else f"mixed-{tasks}"
                self.forwards[name + suffix] = self.mixed(engine, tasks)
        for tasks in self.tasks:
            self.forwards[f"loop-{tasks}"] = self.loop(tasks)

    def engine(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, compiled: bool, kernel: str) -> Engine:
        """An engine over its own copy of the backbone, with `max(tasks)` random tasks installed."""
        backbone = Backbone.load(args.backbone, "random")
        engine = Engine(
            backbone, num_slots=max(args.tasks), device=device, dtype=dtype, max_batch=args.batch, compile=compiled, mona_kernel=kernel
        )
        for slot in range(max(args.tasks)):
            engine.install(slot, random_package(backbone, f"task-{slot}", seed=slot))
        return engine

    def slots(self, tasks: int) -> list[int]:
        """`tasks` tasks spread evenly over the batch, sorted (the engine sorts every batch)."""
        return sorted(i % tasks for i in range(self.batch))

    def mixed(self, engine: Engine, tasks: int) -> Callable[[], object]:
        slots = self.slots(tasks)
        return lambda: engine.features(self.images, slots)

    def loop(self, tasks: int) -> Callable[[], object]:
        engine, slots = self.engines[False, "torch"], torch.tensor(self.slots(tasks))
        values, counts = torch.unique_consecutive(slots, return_counts=True)
        runs = list(zip(values.tolist(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist(), counts.cumsum(0).tolist()))

        def forward() -> list:
            return [engine.features(self.images[start:stop], [slot] * (stop - start)) for slot, start, stop in runs]

        return forward


def time_variants(forwards: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> tuple[dict[str, float], int]:
    """Median seconds per call of each forward, timing them round-robin after two warm-up rounds; and the
    graphs compiled after the warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in forwards}
    warm = 0
    for round_index in range(rounds + 2):
        if round_index == 2:
            warm = graphs_compiled()
        for name, forward in forwards.items():
            synchronize(device)
            start = time.perf_counter()
            forward()
            synchronize(device)
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, graphs_compiled() - warm


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
    variants = Variants(args, device, dtype)
    forwards = variants.forwards
    print(f"{args.backbone}, batch {args.batch}, {dtype}, {device_name(device)}; {args.rounds} interleaved rounds")
    seconds, recompiles = time_variants(forwards, device, args.rounds)
    rows, records = [], []
    for name, s in seconds.items():
        compiled = name.endswith(" compiled")
        ratio = seconds["plain compiled" if compiled else "plain"] / s
        mode = name.split(" ", 1)[1] if " " in name else ""
        one_task = seconds[f"folded {mode}".strip()] / s if name.startswith("mixed") else None
        torch_path = seconds[name.replace(" triton", "")] / s if " triton" in name else None
        shown = [f"{r:.2f}x" if r else "" for r in (ratio, one_task, torch_path)]
        rows.append([name, f"{args.batch / s:.1f}", f"{s * 1e3:.1f}", *shown])
        record = {"variant": name, "images_per_s": args.batch / s, "ms_per_batch": s * 1e3, "ratio_to_plain": ratio}
        records.append(record | {"ratio_to_one_task": one_task, "ratio_to_torch_path": torch_path})
    print_table(["variant", "images/s", "ms/batch", "vs plain", "vs one task", "vs torch path"], rows)
    if args.compile:
        print(f"\ngraphs compiled after warm-up (recompiles): {recompiles}")
    result = {
        "backbone": args.backbone,
        "batch": args.batch,
        "dtype": str(dtype),
        "rounds": args.rounds,
        "compiled": args.compile,
        "recompiles_after_warmup": recompiles,
        "variants": records,
    }
    if args.profile:
        table = profile(forwards[args.profile], device)
        print(f"\nprofile of {args.profile}:\n{table}")
        result["profile"] = {"variant": args.profile, "table": table}
    kind = f"engine-{args.label}" if args.label else "engine"
    print(f"\nwrote {write_result(kind, device, result)}")


if __name__ == "__main__":
    main()
