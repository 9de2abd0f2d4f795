"""The bank's big GEMM, the down projection against [A; B], three ways at each stage of a Swin, side by side.

- dense: one task, every token against one weight matrix (the floor: no routing at all).
- gathered: each sample's weights gathered by its slot id, then one batched matmul (the bank's torch path).
- grouped: `torch._grouped_mm` over the batch sorted by slot, one weight matrix per slot segment (no gather).

T tasks are spread evenly over the batch; ratios are against gathered. bf16 on CUDA, float32 on the CPU
(where `_grouped_mm` runs eagerly but cannot be compiled: its meta function refuses float32).

    python bench/grouped_mm_bench.py                    # CPU: Swin-T widths, batch 8
    python bench/grouped_mm_bench.py --device cuda      # GPU: Swin-B widths, batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monaserve.adapters import INNER_DIM
from monaserve.server.engine import default_dtype

from common import device_name, print_table, write_result

STAGES = {"swin_tiny": [(96, 56), (192, 28), (384, 14), (768, 7)], "swin_base": [(128, 56), (256, 28), (512, 14), (1024, 7)]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    parser.add_argument("--tasks", default="1,8,64", help="task counts to mix, comma-separated (at most the batch)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.backbone = "swin_base" if cuda else "swin_tiny"
    args.batch = args.batch or (64 if cuda else 8)
    args.tasks = [t for t in (int(t) for t in args.tasks.split(",")) if t <= args.batch]
    return args


def down_projections(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, ends: torch.Tensor) -> dict:
    """The three ways to compute each token of `x` `(B, T, m)` against its sample's slot of `weights` `(K, 2n, m)`."""
    flat, stacked = x.view(-1, x.shape[-1]), weights.transpose(1, 2)
    return {
        "dense": lambda: x @ weights[0].T,
        "gathered": lambda: torch.bmm(x, stacked[slots]),
        "grouped": lambda: torch._grouped_mm(flat, stacked, offs=ends),
    }


def median_ms(forward, device: torch.device, rounds: int) -> float:
    forward()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device)
    rows, records = [], []
    for dim, side in STAGES[args.backbone]:
        tokens = side * side
        x = torch.randn(args.batch, tokens, dim, device=device, dtype=dtype)
        weights = torch.randn(max(args.tasks), 2 * INNER_DIM, dim, device=device, dtype=dtype)  # (slot, out, in)
        for tasks in args.tasks:
            slots = torch.tensor(sorted(i % tasks for i in range(args.batch)), device=device)
            ends = (torch.bincount(slots, minlength=weights.shape[0]).cumsum(0) * tokens).to(torch.int32)
            ways = down_projections(x, weights, slots, ends)
            ms = {way: median_ms(forward, device, args.rounds) for way, forward in ways.items()}
            rows.append([dim, f"{side}x{side}", tasks, *(f"{ms[w]:.3f}" for w in ways), f"{ms['gathered'] / ms['grouped']:.2f}x"])
            records.append({"dim": dim, "side": side, "tasks": tasks, "ms": ms})
    print(f"{args.backbone} widths, batch {args.batch}, {dtype}, {device_name(device)}; median of {args.rounds}")
    print_table(["width", "map", "tasks", "dense ms", "gathered ms", "grouped ms", "grouped vs gathered"], rows)
    result = {"batch": args.batch, "dtype": str(dtype), "rounds": args.rounds, "stages": records}
    print(f"\nwrote {write_result('grouped-mm', device, result)}")


if __name__ == "__main__":
    main()
