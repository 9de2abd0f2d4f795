"""Configs as the one source of defaults: a dataclass field holds an option's default and help, and the
command line (flags, `--help` with defaults, `MONASERVE_<FLAG>` environment defaults) is made from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "MONASERVE_"
REQUIRED = dataclasses.MISSING
"""The default of a field the command line must give."""


def option(default: Any, help: str, *, positional: bool = False) -> Any:
    """A config field: `default`, and `help` for `--help`; `positional` for an argument without a dash."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional})


def env_value(flag: str) -> str | None:
    """The value `MONASERVE_<FLAG>` gives `--flag`, if set (`--no-progress` reads `MONASERVE_NO_PROGRESS`)."""
    return os.environ.get(ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_"))


def is_true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _value_type(hint: Any) -> tuple[Any, list | None]:
    """The argparse type and choices for a field's type hint (`X | None` reads as `X`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is Literal:
        return str, list(typing.get_args(hint))
    return (hint if hint in (int, float, str, Path) else str), None


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """A flag (or positional argument) per field of the dataclass `config`, with its default and help.
    A boolean is a switch (on by default: `--no-<name>` turns it off), an optional boolean a pair
    (`--name`, `--no-name`; neither: its default decides); `MONASERVE_<FLAG>` in the
    environment replaces a flag's default (switches take 1/true/yes/on)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        meta, hint = field.metadata, hints[field.name]
        value_type, choices = _value_type(hint)
        if meta["positional"]:
            parser.add_argument(field.name, type=value_type, choices=choices, help=meta["help"])
            continue
        if hint is bool:
            on = field.default
            flag = ("--no-" if on else "--") + field.name.replace("_", "-")
            env = env_value(flag)
            switched = env is not None and is_true(env)
            text = meta["help"] + (f" (on unless {flag})" if on else " (default: off)")
            parser.add_argument(flag, dest=field.name, action="store_false" if on else "store_true", default=on != switched, help=text)
            continue
        flag = "--" + field.name.replace("_", "-")
        if hint == bool | None:  # a switch with a third state, "not given": the setting decides
            env = env_value(flag)
            default = field.default if env is None else is_true(env)
            text = meta["help"] + ("" if "default" in meta["help"] else " (default: the setting decides)")
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        required, default = field.default is dataclasses.MISSING, field.default
        env = env_value(flag)
        if env is not None:
            default, required = value_type(env), False
        shown = "" if required else _shown_default(default, meta["help"])
        parser.add_argument(
            flag,
            dest=field.name,
            type=value_type,
            choices=choices,
            default=None if required else default,
            required=required,
            help=meta["help"] + shown,
        )


def _shown_default(default: Any, help: str) -> str:
    """What `--help` adds to a flag's line: its default, or that it has none (unless the help says already)."""
    if default not in (None, ""):
        return " (default: %(default)s)"
    return "" if "default" in help else " (default: none)"


def config_from_args(config: type, args: argparse.Namespace) -> Any:
    """An instance of `config` from parsed `args`."""
    names = {field.name for field in dataclasses.fields(config)}
    return config(**{name: value for name, value in vars(args).items() if name in names})
