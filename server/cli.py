"""The `monaserve` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="swin_tiny_patch4_window7_224", help="timm Swin name")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--weights", default="hub", help="'hub' (Hugging Face, default) or a local .safetensors/.pth file"
    )
    source.add_argument("--random-init", action="store_true", help="random weights from --seed (offline use)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")


def _backbone_weights(args: argparse.Namespace) -> str:
    return "random" if args.random_init else args.weights


def cmd_info(args: argparse.Namespace) -> int:
    """Print the backbone and what one task's adapters cost on it."""
    from monaserve.adapters import Backbone, adapter_budget
    from monaserve.adapters.swin import block_dims

    backbone = Backbone.load(args.backbone, _backbone_weights(args), seed=args.seed)
    budget = adapter_budget(backbone.model, args.inner_dim)
    model = backbone.model
    head = 2 * backbone.num_features + (backbone.num_features + 1) * args.num_classes
    info = {
        "backbone": backbone.name,
        "weights": f"random (seed {args.seed})" if args.random_init else args.weights,
        "fingerprint": backbone.fingerprint,
        "input_size": list(backbone.input_size),
        "depths": [len(stage.blocks) for stage in model.layers],
        "widths": sorted({dim for _, dim in block_dims(model)}),
        "backbone_parameters": budget.backbone_parameters,
        "mona_modules": budget.num_adapters,
        "mona_inner_dim": args.inner_dim,
        "mona_parameters_per_task": budget.mona_parameters,
        "mona_percent": round(budget.mona_percent, 2),
        "paper_eq6_parameters": budget.paper_eq6_parameters,
        "paper_eq6_percent": round(budget.paper_eq6_percent, 2),
        "folded_values_per_task": budget.folded_parameters,
        "classify_head_parameters": head,
        "classify_head_classes": args.num_classes,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("backbone", f"{info['backbone']}  ({info['weights']})"),
        ("fingerprint", info["fingerprint"]),
        ("input size", "x".join(map(str, info["input_size"]))),
        ("stages", f"depths {info['depths']}, widths {info['widths']}"),
        ("backbone params", f"{budget.backbone_parameters:,} (frozen, shared by all tasks)"),
        ("Mona modules", f"{budget.num_adapters} (2 per block x {budget.num_blocks} blocks), inner dim {args.inner_dim}"),
        ("Mona per task", f"{budget.mona_parameters:,} ({budget.mona_percent:.2f}% of the backbone)"),
        ("paper eq. (6)", f"{budget.paper_eq6_parameters:,} ({budget.paper_eq6_percent:.2f}%)"),
        ("folded per task", f"{budget.folded_parameters:,} values in a GPU slot "
         f"({budget.folded_parameters * 2 / 2**20:.1f} MiB bf16)"),
        (f"classify head", f"{head:,} ({args.num_classes} classes)"),
        ("package (fp32)", f"{(budget.mona_parameters + head) * 4 / 2**20:.1f} MiB per task version"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monaserve", description="Multi-adapter vision inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="backbone and per-task adapter sizes")
    _add_backbone_arguments(info)
    info.add_argument("--inner-dim", type=int, default=64, help="Mona inner dimension")
    info.add_argument("--num-classes", type=int, default=1000, help="classes for the classify head figure")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"monaserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
