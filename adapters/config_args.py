"""Configs as the one source of defaults: a dataclass field holds an option's default and help, and the
command line (flags, `--help` with defaults, `MONASERVE_<NAME>` environment defaults) is made from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "MONASERVE_"


def option(default: Any, help: str, *, positional: bool = False, flag: str | None = None) -> Any:
    """A config field: `default`, `help` for `--help`; `positional` for a required argument without a
    dash, `flag` to name the flag otherwise than after the field."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional, "flag": flag})


REQUIRED = dataclasses.MISSING
"""The default of a field the command line must give."""


def _value_type(hint: Any) -> tuple[Any, list | None]:
    """The argparse type and choices for a field's type hint (`X | None` reads as `X`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is Literal:
        return str, list(typing.get_args(hint))
    return (hint if hint in (int, float, str, Path) else str), None


def add_config_arguments(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """A flag (or positional argument) per field of the dataclass `config`, with its default and help;
    `MONASERVE_<FIELD>` in the environment replaces a flag's default (booleans take 1/true/yes/on)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name in skip or "help" not in field.metadata:
            continue
        meta, hint = field.metadata, hints[field.name]
        value_type, choices = _value_type(hint)
        if meta["positional"]:
            parser.add_argument(field.name, type=value_type, choices=choices, help=meta["help"])
            continue
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        env = os.environ.get(ENV_PREFIX + field.name.upper())
        if hint is bool:  # a switch; one that is on by default is turned off by --no-<name>
            on = field.default
            flag = meta["flag"] or ("--no-" if on else "--") + field.name.replace("_", "-")
            default = on if env is None else env.strip().lower() in ("1", "true", "yes", "on")
            text = meta["help"] + (f" (on unless {flag})" if on else "")
            parser.add_argument(flag, dest=field.name, action="store_false" if on else "store_true", default=default, help=text)
            continue
        if env is not None:
            default, required = value_type(env), False
        shown = "" if required or default in (None, "") else " (default: %(default)s)"
        parser.add_argument(
            flag, dest=field.name, type=value_type, choices=choices, default=default, required=required, help=meta["help"] + shown
        )


def config_from_args(config: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `config` from parsed `args` (fields the command line does not set keep their defaults)."""
    names = {field.name for field in dataclasses.fields(config)}
    values = {name: value for name, value in vars(args).items() if name in names}
    return config(**{**values, **overrides})
