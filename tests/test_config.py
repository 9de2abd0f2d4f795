"""One source of defaults: the `serve` and `train` flags, their defaults in `--help` and their
`MONASERVE_*` variables all come from `ServeConfig` and `TrainConfig`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from monaserve.adapters.trainer import TrainConfig
from monaserve.server.cli import build_parser
from monaserve.server.config import ServeConfig


def subcommand(argv: list[str]):
    return next(a for a in build_parser(argv)._actions if a.dest == "command").choices[argv[0]]


@pytest.mark.parametrize(("command", "config"), [("serve", ServeConfig), ("train", TrainConfig)])
def test_every_field_is_a_flag_with_its_default_and_help(command, config):
    parser = subcommand([command])
    actions = {}
    for action in parser._actions:  # --random-init shares --weights' field: the flag that owns it comes first
        actions.setdefault(action.dest, action)
    for field in dataclasses.fields(config):
        action = actions[field.name]
        assert action.help, field.name
        if field.default is not dataclasses.MISSING:
            assert action.default == field.default, field.name


def test_help_shows_the_defaults():
    text = subcommand(["serve"]).format_help()
    for flag, default in [("--port", "8000"), ("--max-batch", "32"), ("--keep-alive-s", "75.0"), ("--store", "var/adapters")]:
        assert flag in text and f"(default: {default})" in text, flag


def test_environment_variables_set_the_defaults(monkeypatch):
    monkeypatch.setenv("MONASERVE_GPU_SLOTS", "3")
    monkeypatch.setenv("MONASERVE_INSECURE_ADMIN", "true")
    monkeypatch.setenv("MONASERVE_PROGRESS", "0")
    serve = build_parser(["serve"]).parse_args(["serve"])
    assert (serve.gpu_slots, serve.insecure_admin) == (3, True)
    assert build_parser(["serve"]).parse_args(["serve", "--gpu-slots", "5"]).gpu_slots == 5  # a flag beats the variable
    train = build_parser(["train"]).parse_args(["train", "classify", "data", "--name", "t"])
    assert train.progress is False


def test_a_switch_on_by_default_is_turned_off_with_no():
    assert build_parser(["train"]).parse_args(["train", "detect", "d", "--name", "t", "--no-progress"]).progress is False
    assert build_parser(["serve"]).parse_args(["serve", "--random-init"]).weights == "random"


def test_the_client_commands_start_without_torch():
    code = (
        "import sys; from monaserve.server.cli import build_parser; build_parser(['predict', 't', 'x.jpg']); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
