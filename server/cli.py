"""The `monaserve` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from monaserve.client.cli import add_client_commands

ENV_PREFIX = "MONASERVE_"


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
    from monaserve.adapters.trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.weights = _backbone_weights(args)
    config.progress = not args.no_progress
    train(config)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the HTTP server; exits 1 if the backbone cannot be loaded."""
    from .http_server import run
    from .runtime import ServeConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    config = ServeConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.weights = _backbone_weights(args)
    config.replica_id = args.replica_id or f"{socket.gethostname()}:{args.port}"
    config.check()
    if args.demo:
        from .demo import ensure_demo
        from .store import AdapterStore

        ensure_demo(AdapterStore(config.store), config.backbone, config.weights, config.seed, args.demo_data)
    return run(config, host=args.host, port=args.port, log_level=args.log_level)


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let `MONASERVE_<OPTION>` set the default of every `--option` (flags take 1/true/yes)."""
    for action in parser._actions:
        option = next((o for o in action.option_strings if o.startswith("--")), None)
        if option is None or option == "--help":
            continue
        value = os.environ.get(ENV_PREFIX + option[2:].upper().replace("-", "_"))
        if value is None:
            continue
        if action.nargs == 0:
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            action.default = action.type(value) if action.type else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monaserve", description="Multi-adapter vision inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="backbone and per-task adapter sizes")
    _add_backbone_arguments(info)
    info.add_argument("--inner-dim", type=int, default=64, help="Mona inner dimension")
    info.add_argument("--num-classes", type=int, default=1000, help="classes for the classify head figure")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=cmd_info)

    demo = commands.add_parser("demo-data", help="write a synthetic dataset")
    demo.add_argument("dataset", choices=["shapes"])
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--images", type=int, default=300)
    demo.add_argument("--size", type=int, default=160, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo_data)

    train = commands.add_parser("train", help="train a task's Mona adapters and head into a package")
    train.add_argument("kind", choices=["classify", "detect", "segment"])
    train.add_argument("data", type=Path, help="ImageFolder root (classify), COCO json (detect), images folder (segment)")
    train.add_argument("--name", required=True, help="task name")
    train.add_argument("--masks", type=Path, help="segment: folder of PNG class-id masks named like the images")
    train.add_argument("--images", type=Path, help="detect: images folder (default: images/ beside the json)")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--out", type=Path, help="package path (default: NAME-VERSION.safetensors)")
    _add_backbone_arguments(train)
    for flag, kind, default, text in [
        ("--input-size", int, 224, "square input side (multiple of 32)"),
        ("--head-channels", int, 256, "FPN / UperNet width"),
        ("--epochs", int, 10, ""),
        ("--batch-size", int, 16, ""),
        ("--lr", float, 1e-3, "peak AdamW learning rate"),
        ("--weight-decay", float, 0.05, ""),
        ("--clip-grad-norm", float, 10.0, "gradient norm clip"),
        ("--warmup-steps", int, 20, "linear warm-up before the cosine decay"),
        ("--val-fraction", float, 0.2, "held out for the final evaluation"),
        ("--workers", int, 2, "data loader processes"),
        ("--max-steps", int, None, "stop after this many steps"),
    ]:
        train.add_argument(flag, type=kind, default=default, help=text or None)
    train.add_argument("--resize", choices=["resize", "letterbox"], default="resize")
    train.add_argument(
        "--baseline", choices=["mona", "head-only", "full"], default="mona",
        help="mona (default), or the paper's FIXED (head only) or FULL (whole backbone) baseline",
    )
    train.add_argument("--device", default="auto")
    train.add_argument("--checkpoint-dir", type=Path, help="checkpoint every epoch here")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    serve = commands.add_parser("serve", help="start the HTTP server")
    _add_backbone_arguments(serve)
    add = serve.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    add("--port", type=int, default=8000)
    add("--store", default="var/adapters", help="adapter store: a directory, or an fsspec URL such as s3://bucket/prefix")
    add("--catalog-refresh-s", type=float, default=10.0, help="re-read the store this often (0: only on a miss)")
    add("--replica-id", default=None, help="this replica's name in responses and metrics (default: host:port)")
    add("--demo-data", type=Path, default=Path("var/demo-data"), help="where --demo writes its training images")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--gpu-slots", type=int, default=16, help="adapter slots on the device")
    add("--gpu-adapter-mb", type=float, default=None, help="device memory budget for adapters (default: slots only)")
    add("--cpu-cache-mb", type=float, default=1024.0, help="CPU cache of loaded packages")
    add("--max-batch", type=int, default=32, help="images per engine batch")
    add("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    add("--max-queue", type=int, default=512, help="images waiting before requests get 503")
    add("--request-timeout-s", type=float, default=30.0, help="per-request deadline (504 after it)")
    add("--preload", default="", help="tasks to load at start-up: 'all' or a comma-separated list")
    add("--admin-token", default=None, help="bearer token for /v1/adapters (prefer MONASERVE_ADMIN_TOKEN)")
    add("--insecure-admin", action="store_true", help="serve the admin routes without a token")
    add("--api-token", default=None, help="bearer token for inference routes (prefer MONASERVE_API_TOKEN; default: open)")
    add("--cors-origins", default="", help="comma-separated origins allowed to call from browsers (default: none)")
    add("--max-image-bytes", type=int, default=20 * 2**20)
    add("--max-image-pixels", type=int, default=40_000_000, help="pixels of one image as stored")
    add("--max-request-pixels", type=int, default=100_000_000, help="pixels of all images of one request together")
    add("--max-images-per-request", type=int, default=64)
    add("--max-request-mb", type=float, default=64.0, help="body limit of inference requests")
    add("--max-body-buffer-mb", type=float, default=256.0,
        help="request bodies held in memory at once, all requests together (past it: 503 with Retry-After)")
    add("--max-response-mb", type=float, default=64.0, help="largest answer one request may get")
    add("--max-connections", type=int, default=2048, help="open connections; past it, requests get 503 (kept below the descriptor limit)")
    add("--header-timeout-s", type=float, default=10.0, help="a request's headers must arrive within this")
    add("--body-timeout-s", type=float, default=30.0,
        help="longest wait for the next part of a request body, and the grace before --body-min-rate applies")
    add("--body-min-rate", type=float, default=1024.0, help="bytes/s a request body must average after --body-timeout-s (0: off)")
    add("--keep-alive-s", type=float, default=75.0, help="idle keep-alive connections close after this (above a load balancer's 60 s)")
    add("--decode-threads", type=int, default=4)
    add("--drain-delay-s", type=float, default=0.0, help="on SIGTERM, stay up this long with readiness false")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--demo", action="store_true", help="first train the shapes demo tasks into the store if they are missing")
    serve.set_defaults(handler=cmd_serve)
    add_client_commands(commands)  # the client verbs read only MONASERVE_URL and MONASERVE_TOKEN
    for sub in (info, train, serve):
        apply_env_defaults(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
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
