"""One source of defaults: the `serve` and `train` flags, their defaults in `--help` and their
`MONASERVE_*` variables all come from `ServeConfig` and `TrainConfig`."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest

from monaserve.adapters.accounting import InfoConfig
from monaserve.adapters.config_args import config_from_args
from monaserve.adapters.trainer import TrainConfig
from monaserve.server.cli import build_parser
from monaserve.server.config import ServeConfig


def subcommand(argv: list[str]):
    return next(a for a in build_parser(argv)._actions if a.dest == "command").choices[argv[0]]


@pytest.mark.parametrize(("command", "config"), [("serve", ServeConfig), ("train", TrainConfig), ("info", InfoConfig)])
def test_every_field_is_a_flag_with_its_default_and_help(command, config):
    parser = subcommand([command])
    actions = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(config):
        action = actions[field.name]
        assert action.help, field.name
        if field.default is not dataclasses.MISSING:
            assert action.default == field.default, field.name


def test_help_shows_the_defaults():
    text = subcommand(["serve"]).format_help()
    for flag, default in [("--port", "8000"), ("--max-batch", "32"), ("--keep-alive-s", "75.0"), ("--store", "var/adapters")]:
        assert flag in text and f"(default: {default})" in text, flag


@pytest.mark.parametrize("command", ["serve", "train", "info"])
def test_every_flag_says_what_it_does_and_its_default(command):
    """Each flag's `--help` line has a description and its default, from the one source of defaults."""
    for action in subcommand([command])._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert action.help and len(action.help) > 20, action.dest
            assert "default" in action.help or "on unless" in action.help, f"{action.dest}: {action.help}"


def test_environment_variables_set_the_defaults(monkeypatch):
    monkeypatch.setenv("MONASERVE_GPU_SLOTS", "3")
    monkeypatch.setenv("MONASERVE_INSECURE_ADMIN", "true")
    monkeypatch.setenv("MONASERVE_NO_PROGRESS", "1")
    serve = build_parser(["serve"]).parse_args(["serve"])
    assert (serve.gpu_slots, serve.insecure_admin) == (3, True)
    assert build_parser(["serve"]).parse_args(["serve", "--gpu-slots", "5"]).gpu_slots == 5  # a flag beats the variable
    train = build_parser(["train"]).parse_args(["train", "classify", "data", "--name", "t"])
    assert train.progress is False


def test_a_switch_on_by_default_is_turned_off_with_no():
    assert build_parser(["train"]).parse_args(["train", "detect", "d", "--name", "t", "--no-progress"]).progress is False


def test_random_init_is_random_weights_and_refuses_a_weights_file(monkeypatch):
    def serve_config(*argv: str) -> ServeConfig:
        return config_from_args(ServeConfig, build_parser(["serve"]).parse_args(["serve", *argv]))

    assert serve_config("--random-init").weights == "random"
    assert serve_config().weights == "hub"
    with pytest.raises(ValueError, match="contradict"):
        serve_config("--weights", "w.pth", "--random-init")
    monkeypatch.setenv("MONASERVE_RANDOM_INIT", "1")
    assert serve_config().weights == "random"
    monkeypatch.setenv("MONASERVE_WEIGHTS", "random")
    monkeypatch.delenv("MONASERVE_RANDOM_INIT")
    info = build_parser(["info"]).parse_args(["info"])
    assert info.weights == "random"  # info reads the environment too


def test_the_client_commands_start_without_torch():
    code = (
        "import sys; from monaserve.server.cli import build_parser; build_parser(['predict', 't', 'x.jpg']); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_a_replica_name_no_header_can_carry_is_refused():
    with pytest.raises(ValueError, match="must be printable ASCII"):
        ServeConfig(replica_id="réplica-1").check()


def test_a_device_torch_does_not_know_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="--device 'gpu0' is not a device: give auto, cpu, cuda or cuda:N"):
        ServeConfig(device="gpu0").check()
    ServeConfig(device="cuda:1").check()  # a device name, whether or not this machine has it


def test_compile_is_a_three_way_switch_whose_default_follows_the_device(monkeypatch):
    def parsed(*argv: str) -> ServeConfig:
        return config_from_args(ServeConfig, build_parser(["serve"]).parse_args(["serve", *argv]))

    assert parsed().compile is None and parsed("--compile").compile is True and parsed("--no-compile").compile is False
    assert ServeConfig(device="cpu").compiled is False and ServeConfig(device="cuda").compiled is True
    assert ServeConfig(device="cuda", compile=False).compiled is False and ServeConfig(device="cpu", compile=True).compiled
    monkeypatch.setenv("MONASERVE_COMPILE", "0")
    assert parsed().compile is False


def test_the_triton_kernel_is_refused_off_a_gpu_with_the_way_out(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="--mona-kernel triton needs --device cuda"):
        ServeConfig(device="cpu", mona_kernel="triton").check()
    if importlib.util.find_spec("triton") is not None:  # torch's CUDA wheels bring it
        ServeConfig(device="cuda", mona_kernel="triton").check()
