"""How many tasks one device holds, and what a task switch costs, against one full model per task.

Memory math at the serving dtype (bf16 on a GPU): the backbone once, plus per task its folded Mona slot
and head; the naive deployment holds a whole model per task (backbone, Mona and head). The workspace
for a batch is measured on CUDA (peak of one forward at --batch) and taken from --workspace-gib elsewhere.

Measured on the device, side by side and interleaved: an engine with --slots filled slots and its
memory; switching a task in from a local file, the naive way (load a full model's weights into a
resident model) against the adapter way (read, validate, fold and install one package).

    python bench/capacity_bench.py                 # CPU: Swin-B, 64 slots, float32 measured
    python bench/capacity_bench.py --device cuda   # GPU: Swin-B, 1000 slots, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from monaserve.adapters import (
    AdapterPackage,
    Backbone,
    Manifest,
    Mona,
    MonaBank,
    build_head,
    create_swin,
    forward_pyramid,
    inject_mona,
)
from monaserve.adapters.swin import block_dims
from monaserve.adapters.synthetic import make_manifest, random_package
from monaserve.server.engine import Engine, default_dtype

from common import print_table, scratch_folder, write_result

GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="swin_base_patch4_window7_224")
    parser.add_argument("--device-gib", type=float, default=80.0, help="device memory for the math (an 80 GB card)")
    parser.add_argument("--workspace-gib", type=float, default=8.0, help="batch workspace where it cannot be measured")
    parser.add_argument("--labels", type=int, default=1000, help="classes of each task's classify head")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--slots", type=int, default=None, help="slots filled on the device (default 1000 / 64)")
    parser.add_argument("--switches", type=int, default=5, help="timed switches of each kind")
    args = parser.parse_args()
    args.slots = args.slots or (1000 if args.device.startswith("cuda") else 64)
    return args


def nbytes(module: torch.nn.Module, element_size: int) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()]) * element_size


def memory_math(backbone: Backbone, labels: int, element_size: int, device_bytes: float, workspace: float) -> dict:
    """Per-task and total bytes for the shared engine and for one model copy per task."""
    manifest = make_manifest(backbone, "sizing", num_labels=labels)
    with torch.device("meta"):
        head = build_head(manifest, backbone.stage_dims)
        mona = {dim: Mona(dim) for dim in {dim for _, dim in block_dims(backbone.model)}}
    widths = [dim for _, dim in block_dims(backbone.model) for _ in ("mona1", "mona2")]
    slot = sum(sum(torch.Size(s).numel() for s in MonaBank.slot_shapes(dim, 64).values()) for dim in widths) * element_size
    backbone_bytes = nbytes(backbone.model, element_size)
    head_bytes = nbytes(head, element_size)
    full_model = backbone_bytes + sum(nbytes(mona[dim], element_size) for dim in widths) + head_bytes
    free = device_bytes - workspace
    return {
        "backbone_bytes": backbone_bytes,
        "slot_bytes": slot,
        "head_bytes": head_bytes,
        "per_task_bytes": slot + head_bytes,
        "workspace_bytes": workspace,
        "tasks_resident": int((free - backbone_bytes) // (slot + head_bytes)),
        "naive_per_task_bytes": full_model,
        "naive_tasks_resident": int(free // full_model),
    }


def allocated(device: torch.device) -> int:
    """Bytes held: CUDA allocations on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status: cannot measure host memory")


def measure_workspace(engine: Engine, batch: int) -> int:
    """Peak CUDA bytes one mixed batch adds on top of what is resident."""
    torch.cuda.reset_peak_memory_stats(engine.device)
    base = allocated(engine.device)
    engine.run(torch.randn(batch, 3, *engine.backbone.input_size), [i % engine.num_slots for i in range(batch)])
    return torch.cuda.max_memory_allocated(engine.device) - base


def full_model(name: str, manifest: Manifest) -> nn.Module:
    """One task as a whole model, the naive deployment: its own Swin with reference Mona, and its head."""
    model = create_swin(name, "random")
    inject_mona(model, lambda dim: Mona(dim))
    stage_dims = [stage.blocks[-1].norm1.normalized_shape[0] for stage in model.layers]
    return nn.ModuleDict({"backbone": model, "head": build_head(manifest, stage_dims)})


def time_switches(engine: Engine, resident: nn.Module, adapter_files: list[Path], model_files: list[Path]) -> dict:
    """Median ms of three ways to switch a task in from a local file, interleaved file by file."""
    device, dtype, name, manifest = engine.device, engine.dtype, engine.backbone.name, engine.manifests[0]

    def weights_into_resident(model_file: Path, _: Path) -> None:
        resident.load_state_dict(load_file(model_file, device=str(device)))

    def new_full_model(model_file: Path, _: Path) -> None:
        with torch.device(device):
            model = full_model(name, manifest).to(dtype)
        model.load_state_dict(load_file(model_file, device=str(device)))

    def adapter_into_slot(_: Path, adapter_file: Path) -> None:
        engine.install(0, AdapterPackage.read(adapter_file))

    ways = [weights_into_resident, new_full_model, adapter_into_slot]
    times: dict[str, list[float]] = {way.__name__: [] for way in ways}
    for model_file, adapter_file in zip(model_files, adapter_files):
        for way in ways:
            start = time.perf_counter()
            way(model_file, adapter_file)
            allocated(device)  # synchronises CUDA
            times[way.__name__].append(time.perf_counter() - start)
    return {way: 1e3 * statistics.median(values) for way, values in times.items()}


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device)
    workdir = scratch_folder("monaserve-capacity-")
    sizing = Backbone.load(args.backbone, "random")

    before = allocated(device)
    backbone = Backbone.load(args.backbone, "random")
    engine = Engine(backbone, num_slots=args.slots, device=device, dtype=dtype, max_batch=args.batch)
    package = random_package(backbone, "task", seed=0, num_labels=args.labels)
    start = time.perf_counter()
    for slot in range(args.slots):
        engine.install(slot, package)
    fill_s = time.perf_counter() - start
    engine_bytes = allocated(device) - before
    workspace = measure_workspace(engine, args.batch) if device.type == "cuda" else args.workspace_gib * GIB
    engine.mapping.set(sorted(range(args.slots - args.batch, args.slots)) if args.slots >= args.batch else [0] * args.batch)
    forward_pyramid(engine.model, torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype))

    element_size = torch.tensor([], dtype=torch.bfloat16).element_size()
    math = memory_math(sizing, args.labels, element_size, args.device_gib * GIB, workspace)
    measured_per_task = (engine_bytes - nbytes(sizing.model, torch.tensor([], dtype=dtype).element_size())) / args.slots

    resident = full_model(args.backbone, package.manifest).to(device, dtype)
    model_files, adapter_files = [], []
    for i in range(args.switches):
        model_files.append(workdir / f"model-{i}.safetensors")
        save_file({k: v.contiguous() for k, v in resident.state_dict().items()}, model_files[-1])
        adapter_files.append(random_package(backbone, "task", seed=i, num_labels=args.labels).save(workdir / f"adapter-{i}.safetensors"))
    switch = time_switches(engine, resident, adapter_files, model_files)

    mib = 2**20
    print(f"{args.backbone}, {args.labels}-class heads; memory math at bf16 for a {args.device_gib:.0f} GiB device")
    print_table(
        ["", "per task MiB", "shared MiB", f"tasks resident in {args.device_gib:.0f} GiB"],
        [
            [
                "monaserve (folded Mona slot + head)",
                f"{math['per_task_bytes'] / mib:.1f}",
                f"{(math['backbone_bytes'] + workspace) / mib:.0f}",
                math["tasks_resident"],
            ],
            [
                "one full model per task",
                f"{math['naive_per_task_bytes'] / mib:.1f}",
                f"{workspace / mib:.0f}",
                math["naive_tasks_resident"],
            ],
        ],
    )
    print(
        f"\nslot {math['slot_bytes'] / mib:.2f} MiB + head {math['head_bytes'] / mib:.2f} MiB per task; backbone "
        f"{math['backbone_bytes'] / mib:.0f} MiB; workspace {workspace / mib:.0f} MiB "
        f"({'measured at batch ' + str(args.batch) if device.type == 'cuda' else 'assumed, --workspace-gib'})"
    )
    print(
        f"measured on {args.device} ({dtype}): {args.slots} slots filled in {fill_s:.1f} s, "
        f"{engine_bytes / mib:.0f} MiB for the engine, {measured_per_task / mib:.2f} MiB per task beyond the backbone\n"
    )
    print_table(
        ["task switch from a local file", "median ms", "vs adapter"],
        [
            [label, f"{switch[key]:.0f}", f"{switch[key] / switch['adapter_into_slot']:.1f}x"]
            for label, key in [
                ("naive: full model's weights into a resident model", "weights_into_resident"),
                ("naive: a new full model (built on the device, weights loaded)", "new_full_model"),
                ("monaserve: read, validate, fold, install one adapter", "adapter_into_slot"),
            ]
        ],
    )
    result = {
        "backbone": args.backbone,
        "labels": args.labels,
        "slots": args.slots,
        "fill_s": fill_s,
        "dtype": str(dtype),
        "memory_math_bf16": math,
        "measured_engine_bytes": engine_bytes,
        "measured_per_task_bytes": measured_per_task,
        "switch": switch,
    }
    print(f"wrote {write_result('capacity', device, result)}")


if __name__ == "__main__":
    main()
