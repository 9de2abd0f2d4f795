"""The private folder of a server run with `--workers`: what its processes share, and where."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

from .config import ServeConfig
from .lifecycle import Progress

log = logging.getLogger(__name__)
TALLY_ROWS = 2
"""Body budgets the front ends share (inference bodies, uploads), each a row of int64s, one per front end."""
SECRETS = {"admin_token": "MONASERVE_ADMIN_TOKEN", "api_token": "MONASERVE_API_TOKEN"}
"""Settings that never go into the folder: children get them in their environment."""


@dataclass(frozen=True)
class RunDir:
    """The folder (mode 0700, made by the supervisor) and what lives in it."""

    path: Path

    @classmethod
    def make(cls, config: ServeConfig) -> RunDir:
        run = cls(Path(tempfile.mkdtemp(prefix="monaserve-")))
        run.metrics.mkdir()
        shared = dataclasses.asdict(dataclasses.replace(config, **dict.fromkeys(SECRETS)))
        run.config.write_text(json.dumps(shared, default=str))
        run.config.chmod(0o600)
        run.tallies.write_bytes(bytes(8 * TALLY_ROWS * config.front_ends))
        return run

    @property
    def engine_socket(self) -> str:
        """The engine's socket for front ends' runs and lookups (`EngineService`)."""
        return str(self.path / "engine.sock")

    @property
    def admin_socket(self) -> str:
        """The engine process's own HTTP server, for the admin calls front ends forward."""
        return str(self.path / "admin.sock")

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        """Every process's metrics files (`PROMETHEUS_MULTIPROC_DIR`)."""
        return self.path / "metrics"

    @property
    def tallies(self) -> Path:
        """The front ends' shared body budgets (`budgets.SharedTally`)."""
        return self.path / "tallies"

    @property
    def progress(self) -> Path:
        """The engine process's start-up progress, which front ends answer readiness probes with while it loads."""
        return self.path / "progress.json"

    def write_progress(self, progress: Progress) -> None:
        """Replace the progress file at once (a rename), so a front end never reads half of it; a write that
        fails costs the front ends' readiness answer its detail, never the start-up (it is logged)."""
        part = self.progress.with_suffix(".part")
        try:
            part.write_text(json.dumps(progress.to_json()))
            part.replace(self.progress)
        except OSError as exc:
            log.warning("could not write the start-up progress for the front ends: %s", exc)

    def read_progress(self) -> Progress | None:
        """The engine's last progress, or None before it wrote any."""
        try:
            return Progress.from_json(json.loads(self.progress.read_text()))
        except FileNotFoundError:
            return None

    def read_config(self) -> ServeConfig:
        """The supervisor's config as a child reads it: paths typed as paths, secrets from the environment."""
        values = json.loads(self.config.read_text())
        hints = typing.get_type_hints(ServeConfig)
        values = {name: Path(value) if hints[name] is Path else value for name, value in values.items()}
        return ServeConfig(**values | {name: os.environ.get(variable) for name, variable in SECRETS.items()})


def secrets_environment(config: ServeConfig) -> dict[str, str]:
    """The environment that carries `config`'s secrets to a child."""
    return {variable: getattr(config, name) for name, variable in SECRETS.items() if getattr(config, name) is not None}
