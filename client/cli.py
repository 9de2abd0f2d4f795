"""The client's verbs of the `monaserve` command: `predict` and `adapters list|upload|load|unload`.

They talk to a running server (`--url`, `--token`, or MONASERVE_URL / MONASERVE_TOKEN) and print
people-readable lines, or the server's JSON with `--json`. No torch is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .client import DEFAULT_URL, MonaClient
from .errors import MonaError, MonaServerError
from .results import Classification, Detections, Result, parse_results


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    """Add `predict` and `adapters` to the `monaserve` sub-commands."""
    predict = commands.add_parser("predict", help="run images through a task on a server")
    _add_connection_arguments(predict)
    predict.add_argument("task")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--kind", choices=["classify", "detect", "segment"], help="default: the task's own")
    predict.add_argument("--top-k", type=int, default=5, help="classify: labels per image")
    predict.add_argument("--min-score", type=float, help="detect: drop boxes scoring less (default: the task's)")
    predict.add_argument("--max-detections", type=int, help="detect: the most boxes per image (default: the task's)")
    predict.add_argument(
        "--class-agnostic",
        action=argparse.BooleanOptionalAction,
        help="detect: one box per object, whatever its label (default: the task's)",
    )
    predict.add_argument("--version", type=int, help="pin an adapter version")
    predict.add_argument("--draw", type=Path, metavar="OUT.png", help="write the image with the result drawn on it")
    predict.set_defaults(handler=cmd_predict)

    adapters = commands.add_parser("adapters", help="manage a server's adapters (needs the admin token)")
    verbs = adapters.add_subparsers(dest="verb", required=True)
    upload = verbs.add_parser("upload", help="upload a package; it is served once validated and loaded")
    upload.add_argument("package", type=Path)
    upload.add_argument("--task", help="default: the name in the package's manifest")
    upload.add_argument("--version", type=int, help="store it as this version (default: the task's next)")
    load = verbs.add_parser("load", help="load a stored version (default: the newest) and serve it")
    load.add_argument("task")
    load.add_argument("--version", type=int)
    unload = verbs.add_parser("unload", help="stop serving a task (and delete it from the store with --purge)")
    unload.add_argument("task")
    unload.add_argument("--purge", action="store_true")
    listing = verbs.add_parser("list", help="tasks, versions and where each is loaded")
    for verb in (listing, upload, load, unload):
        _add_connection_arguments(verb)
        verb.set_defaults(handler=cmd_adapters)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """`--url` and `--token`, the only options of the client verbs that the environment may set."""
    parser.add_argument("--url", default=os.environ.get("MONASERVE_URL", DEFAULT_URL), help="the server (MONASERVE_URL)")
    token = os.environ.get("MONASERVE_TOKEN") or os.environ.get("MONASERVE_ADMIN_TOKEN")
    parser.add_argument("--token", default=token, help="admin token (MONASERVE_TOKEN, else MONASERVE_ADMIN_TOKEN)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer as it sent it (one line)")


def _client(args: argparse.Namespace) -> MonaClient:
    return MonaClient(args.url, token=args.token, timeout=args.timeout)


def cmd_predict(args: argparse.Namespace) -> int:
    def run() -> dict:
        with _client(args) as client:
            kind = args.kind or client.task(args.task)["kind"]
            params = {
                "classify": {"top_k": args.top_k},
                "detect": {"min_score": args.min_score, "max_detections": args.max_detections, "class_agnostic": args.class_agnostic},
            }.get(kind, {})
            return client.predict_json(args.task, list(args.images), kind, version=args.version, **params)

    body = _guard(run)
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body))
    for index, (path, result) in enumerate(zip(args.images, parse_results(body))):
        if not args.json:
            print(f"{path}: {describe(result)}")
        if args.draw:
            from PIL import Image

            from .draw import draw_result

            out = args.draw if len(args.images) == 1 else args.draw.with_stem(f"{args.draw.stem}-{index}")
            draw_result(Image.open(path), result).save(out)
            if not args.json:
                print(f"  drawn to {out}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        calls = {
            "list": lambda: client.list(),
            "upload": lambda: client.upload(args.package, task=args.task, version=args.version),
            "load": lambda: client.load(args.task, args.version),
            "unload": lambda: client.unload(args.task, purge=args.purge),
        }
        body = _guard(calls[args.verb])
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
    elif args.verb == "list":
        for task in body["tasks"]:
            versions = ", ".join(f"v{v['version']}{'*' if v['serving'] else ''} ({where(v)})" for v in task["versions"])
            print(f"{task['name']:24} {task['kind']:9} {'' if task['enabled'] else 'unloaded '}{versions}")
        device = body["device"]
        print(f"device {device['device']} {device['dtype']}: {device['slots_used']}/{device['slots']} slots used")
    elif args.verb == "unload":
        print(f"{body['task']}: unloaded{' and purged' if body['purged'] else ''}")
    elif args.verb == "upload":
        print(f"{body['name']}: stored as v{body['version']}; serving v{body['serving_version']} ({body['kind']}, {body['labels']} labels)")
    else:
        print(f"{body['name']}: serving v{body['serving_version']} ({body['kind']}, {body['labels']} labels)")
    return 0


def where(version: dict) -> str:
    """Where a version is loaded, as `adapters list` says it: 'cuda slot 3', 'cache' or 'store'."""
    return f"{version['device']} slot {version['slot']}" if version["location"] == "slot" else version["location"]


TOKEN_HINTS = {
    401: "give the server's token with --token (or MONASERVE_TOKEN)",
    403: "the token was refused: --token (or MONASERVE_TOKEN) must be the server's admin token (or its API token, to infer)",
}
"""What to do about a refused token, said after the server's own message."""


def _guard(call):
    """Run `call`; on a client error or an unreadable file print what went wrong (and, for a refused
    token, how to give one) and return None."""
    try:
        return call()
    except (MonaError, OSError, ValueError) as exc:
        hint = TOKEN_HINTS.get(exc.status) if isinstance(exc, MonaServerError) else None
        print(f"monaserve: {exc}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return None


def describe(result: Result) -> str:
    """One line for people."""
    if isinstance(result, Classification):
        return ", ".join(f"{label.label} {label.score:.3f}" for label in result.top(3)) + f"  (v{result.version})"
    if isinstance(result, Detections):
        boxes = "; ".join(f"{d.label} {d.score:.2f} at [{', '.join(f'{c:.0f}' for c in d.box)}]" for d in result.detections)
        return f"{len(result.detections)} boxes{': ' + boxes if boxes else ''}  (v{result.version})"
    areas = ", ".join(f"{c.label} {100 * c.pixels / (result.width * result.height):.1f}%" for c in result.classes)
    return f"{areas}  (v{result.version})"
