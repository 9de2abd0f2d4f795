"""The `monaserve` command line.

`info`, `train` and `serve` take their flags from their configs (`InfoConfig`, `TrainConfig`,
`ServeConfig`: the one source of their defaults), in modules that import torch; those are filled in
only for the command that runs, so the client commands start at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from monaserve.client.cli import add_client_commands

log = logging.getLogger(__name__)


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    from monaserve.adapters.accounting import InfoConfig
    from monaserve.adapters.config_args import add_config_arguments

    add_config_arguments(parser, InfoConfig)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from monaserve.adapters.config_args import add_config_arguments
    from monaserve.adapters.trainer import TrainConfig

    add_config_arguments(parser, TrainConfig)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from monaserve.adapters.config_args import add_config_arguments

    from .config import ServeConfig

    add_config_arguments(parser, ServeConfig)


def _add_import_mona_arguments(parser: argparse.ArgumentParser) -> None:
    from monaserve.adapters.config_args import add_config_arguments
    from monaserve.adapters.import_mona import ImportConfig

    add_config_arguments(parser, ImportConfig)


ARGUMENTS = {
    "info": _add_info_arguments,
    "train": _add_train_arguments,
    "serve": _add_serve_arguments,
    "import-mona": _add_import_mona_arguments,
}


def cmd_info(args: argparse.Namespace) -> int:
    """Print the backbone and what one task's adapters cost on it."""
    from monaserve.adapters import Backbone, adapter_budget
    from monaserve.adapters.accounting import InfoConfig
    from monaserve.adapters.config_args import config_from_args
    from monaserve.adapters.swin import block_dims

    args = config_from_args(InfoConfig, args)

    backbone = Backbone.load(args.backbone, args.weights, seed=args.seed)
    budget = adapter_budget(backbone.model, args.inner_dim)
    model = backbone.model
    head = 2 * backbone.num_features + (backbone.num_features + 1) * args.num_classes
    info = {
        "backbone": backbone.name,
        "weights": backbone.weights,
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
        ("folded per task", f"{budget.folded_parameters:,} values in a GPU slot ({budget.folded_parameters * 2 / 2**20:.1f} MiB bf16)"),
        ("classify head", f"{head:,} ({args.num_classes} classes)"),
        ("package (fp32)", f"{(budget.mona_parameters + head) * 4 / 2**20:.1f} MiB per task version"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the synthetic shapes dataset in all three formats."""
    from monaserve.adapters.data.shapes import write_shapes

    out = write_shapes(args.out, num_images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {args.images} images to {out}/classify (ImageFolder), {out}/detect (COCO json), {out}/segment (masks)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train Mona + head on a dataset and write an adapter package."""
    from monaserve.adapters.config_args import config_from_args
    from monaserve.adapters.trainer import TrainConfig, train

    train(config_from_args(TrainConfig, args))
    return 0


def cmd_import_mona(args: argparse.Namespace) -> int:
    """Import Mona adapters trained with the official Mona code (or ours) into a package or a file training starts from."""
    from monaserve.adapters.config_args import config_from_args
    from monaserve.adapters.import_mona import ImportConfig, run_import

    print(run_import(config_from_args(ImportConfig, args)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the HTTP server; exits 1 if the backbone cannot be loaded."""
    from monaserve.adapters.config_args import config_from_args

    from .config import ServeConfig
    from .http_server import run
    from .workers import check_ports_free

    config = config_from_args(ServeConfig, args)
    config.check()
    check_ports_free(config)  # before the demo trains or the backbone loads: a busy port is said at once
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.admin_token is None and not config.insecure_admin:
        log.warning("the admin API is off (uploads, loads, the repository): start with --admin-token or MONASERVE_ADMIN_TOKEN")
    if config.front_ends > 1:
        from .workers import serve_workers

        return serve_workers(config)
    return run(config)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; with `argv`, only the command it names gets its flags (all of them without)."""
    parser = argparse.ArgumentParser(prog="monaserve", description="Multi-adapter vision inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    heavy = {
        "info": (commands.add_parser("info", help="backbone and per-task adapter sizes"), cmd_info),
        "train": (commands.add_parser("train", help="train a task's Mona adapters and head into a package"), cmd_train),
        "serve": (commands.add_parser("serve", help="start the HTTP server"), cmd_serve),
        "import-mona": (
            commands.add_parser("import-mona", help="import Mona adapters trained with the official Mona code"),
            cmd_import_mona,
        ),
    }
    for name, (command, handler) in heavy.items():
        if chosen is None or chosen == name:
            ARGUMENTS[name](command)
        command.set_defaults(handler=handler)

    demo = commands.add_parser("demo-data", help="write a synthetic dataset")
    demo.add_argument("dataset", choices=["shapes"])
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--images", type=int, default=300, help="images to write")
    demo.add_argument("--size", type=int, default=160, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="seed of the shapes")
    demo.set_defaults(handler=cmd_demo_data)
    add_client_commands(commands)  # the client verbs read only MONASERVE_URL and MONASERVE_TOKEN
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except ValueError as exc:  # a MONASERVE_* variable that does not parse
        print(f"monaserve: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"monaserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
