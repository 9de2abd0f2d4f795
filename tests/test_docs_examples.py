"""The README's and docs' examples, run as written against a real server, in the order a reader meets them.

Every `console`, `bash` and `python` block of README.md and docs/ is either run here (`SESSION`) or
named in `NOT_RUN` with the reason; a new example must be one or the other. The session starts the
README's run command, `monaserve serve --random-init --demo`, in a folder of its own (and checks, as it
starts, that it answers probes meanwhile and that the demo learns), then runs each block there,
changing only the ports (`Session.rewrite`) and what `EDITS` lists. A
command must succeed (exit 0, or fail where its documented output is an error), and its output must
have the documented form: the keys of a documented JSON answer, its error code, and each documented
line of text with numbers and labels taken as placeholders (random weights choose other labels and
scores than the docs show).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from monaserve.server.demo import DEMO_TASKS
from monaserve.server.store import AdapterStore

from helpers import assert_demo_progress
from server_harness import ServerProcess, image_bytes

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LANGUAGES = ("console", "bash", "python")
TOKEN = "change-me"
LABELS = re.compile(r"\b(cat|dog|rabbit|circle|square|triangle|background)\b")
"""Labels of the docs' tasks (pets' and the demo's): which of them an answer names depends on the weights."""

Block = tuple[str, str, int]
"""(page, language, index of the block among the page's blocks of that language)"""

SESSION: list[Block] = [
    ("README.md", "console", 0),  # the demo's classify
    ("docs/serving.md", "console", 0),  # the demo's three kinds
    ("docs/serving.md", "bash", 0),  # makes pets-1.safetensors
    ("docs/package-format.md", "python", 0),  # the same, in Python
    ("docs/clients.md", "console", 0),  # the CLI verbs: pets uploaded, used, then purged
    ("docs/serving.md", "console", 1),  # the curl session: pets uploaded anew, classify, list, metrics, a wrong kind
    ("docs/protocol.md", "console", 1),  # /v2 infer with curl
    ("docs/protocol.md", "python", 0),  # Triton's gRPC client
    ("README.md", "python", 0),
    ("docs/clients.md", "python", 0),
    ("docs/architecture.md", "python", 0),  # the engine on its own, on the demo's packages
    ("docs/training.md", "bash", 0),
    ("docs/training.md", "console", 0),  # a trained package uploaded to the demo server
    ("docs/architecture.md", "console", 0),
    ("docs/architecture.md", "console", 1),
]
NOT_RUN: dict[Block, str] = {
    ("README.md", "bash", 0): "the install and run command: this session runs the run command; the fresh-clone check runs both",
    ("README.md", "bash", 1): "the test command: it runs this test",
    (
        "docs/deployment.md",
        "bash",
        0,
    ): "docker, compose and kubectl: no container engine or cluster here (tests/test_deploy.py reads the files)",
    ("docs/deployment.md", "bash", 1): "docker, compose and kubectl: no container engine or cluster here",
    ("docs/deployment.md", "bash", 2): "docker, compose and kubectl: no container engine or cluster here",
    ("docs/deployment.md", "console", 0): "podman, buildah and debootstrap as root, minutes of building: tests/test_image.py runs them",
    ("docs/protocol.md", "console", 0): "regenerates checked-in modules; tests/test_grpc.py fails while they are stale",
    **{
        ("docs/performance.md", "bash", i): "a benchmark of minutes; tests/test_bench.py runs each benchmark at a smoke size"
        for i in range(10)
    },
    ("docs/reliability.md", "bash", 0): "the soak and attack runs take minutes; tests/test_bench.py and the hardening tests run them small",
    ("docs/reliability.md", "bash", 1): "the soak and attack runs take minutes; tests/test_bench.py and the hardening tests run them small",
    **{
        ("docs/reproduce.md", "bash", i): "hours of GPU training on the real datasets; tests/test_reproduce.py runs each at toy size"
        for i in range(5)
    },
}
EDITS = {"--max-steps 150": "--max-steps 2", "--images 240": "--images 40"}
"""Changes to what a block says, for time: the training recipe runs 2 steps per task, not 150, on 40 images, not 240."""


def blocks(page: str) -> dict[Block, str]:
    """The fenced blocks of `page` in `LANGUAGES`, numbered per language in the order they come."""
    found: dict[Block, str] = {}
    counts = dict.fromkeys(LANGUAGES, 0)
    for language, body in re.findall(r"^```(\w+)\n(.*?)^```", (ROOT / page).read_text(), re.DOTALL | re.MULTILINE):
        if language in LANGUAGES:
            found[(page, language, counts[language])] = body
            counts[language] += 1
    return found


def every_block() -> dict[Block, str]:
    return {key: body for page in PAGES for key, body in blocks(page).items()}


@dataclass
class Command:
    """One `$` line of a console block (with the lines that finish its quotes), and the output the docs show after it."""

    text: str
    output: list[str]


def commands(console: str) -> list[Command]:
    found: list[Command] = []
    lines = console.splitlines()
    while lines:
        line = lines.pop(0)
        if not line.startswith("$ "):
            if found and line.strip() and not line.startswith("#"):
                found[-1].output.append(line)
            continue
        text = line[2:]
        while lines and not complete(text):
            text += "\n" + lines.pop(0)
        found.append(Command(text, []))
    return found


def complete(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
        return True
    except ValueError:  # an open quote: the command goes on on the next line
        return False


def skeleton(text: str) -> list[str]:
    """A line's words with numbers and labels as placeholders, in order of the words (answers list them by score)."""
    return sorted(LABELS.sub("<label>", re.sub(r"\d+(\.\d+)?", "#", text)).split())


def check_output(command: Command, result: subprocess.CompletedProcess, item_keys: set[str]) -> None:
    """`result` has the documented form; a documented key may be missing from an answer whose lists came back
    empty (the demo's detector, trained a few steps, finds no box) if it is a key of a list item's schema."""
    documented = "\n".join(command.output)
    where = f"$ {command.text}\nexit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    failing = '"error"' in documented or "error:" in documented
    assert (result.returncode != 0) == (failing and not command.text.startswith("curl")), where  # curl exits 0 on an HTTP error
    if not documented:
        return
    said = result.stdout + result.stderr
    if documented.lstrip().startswith(("{", "[")):
        for line in result.stdout.strip().splitlines():
            json.loads(line)
        for key in re.findall(r'"(\w+)":', documented):
            answered = f'"{key}":' in said or ("[]" in said and key in item_keys)
            assert answered, f"key {key!r} is documented but not answered\n{where}"
        for code in re.findall(r'"error":\s*"(\w+)"', documented):
            assert re.search(rf'"error":\s*"{code}"', said), where
        return
    answered = [skeleton(line) for line in said.splitlines()]
    for line in command.output:
        if "..." not in line:
            assert skeleton(line) in answered, f"documented line {line!r} has no match\n{where}"


def list_item_keys(schemas: dict[str, dict]) -> set[str]:
    """The properties of the OpenAPI schemas that some list's items refer to."""
    items = {
        prop["items"]["$ref"].rsplit("/", 1)[-1]
        for schema in schemas.values()
        for prop in schema.get("properties", {}).values()
        if "$ref" in prop.get("items", {})
    }
    return {key for name in items for key in schemas[name].get("properties", {})}


@dataclass
class Session:
    """A folder as a reader's working directory, the server the docs talk to, and the environment they set."""

    folder: Path
    server: ServerProcess
    env: dict[str, str]
    item_keys: set[str]
    """The property names of the server's OpenAPI schemas that are list items (a detection's, say)."""

    def rewrite(self, text: str) -> str:
        """`text` with the docs' ports made this server's, and `EDITS` made."""
        for doc, real in {
            "localhost:8000": f"127.0.0.1:{self.server.port}",
            "127.0.0.1:8000": f"127.0.0.1:{self.server.port}",
            "localhost:8001": self.server.grpc_target,
        }.items():
            text = text.replace(doc, real)
        for doc, real in EDITS.items():
            text = text.replace(doc, real)
        return text

    def run(self, argv: list[str], stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.folder, env=self.env, input=stdin, capture_output=True, text=True, timeout=timeout)

    def console(self, body: str) -> None:
        for command in commands(body):
            text = self.rewrite(command.text)
            if text.startswith("export "):
                self.env.update(dict(assignment.split("=", 1) for assignment in shlex.split(text)[1:]))
                continue
            check_output(command, self.run(["bash", "-c", text]), self.item_keys)

    def bash(self, body: str) -> None:
        result = self.run(["bash", "-e", "-c", self.rewrite(body)], timeout=600)
        assert result.returncode == 0, f"{body}\nstdout: {result.stdout}\nstderr: {result.stderr}"

    def python(self, body: str) -> None:
        result = self.run([sys.executable, "-"], stdin=self.rewrite(body))
        assert result.returncode == 0, f"{body}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        said = [skeleton(line) for line in result.stdout.splitlines()]
        for comment in re.findall(r"^\s*print\(.*\)\s*#\s*(.+)$", body, re.MULTILINE):  # what the docs say it prints
            assert skeleton(comment) in said, f"{body}\nprinted: {result.stdout}"


def test_every_example_is_run_or_says_why_not():
    found = set(every_block())
    assert found == set(SESSION) | set(NOT_RUN), {
        "neither run nor excused": found - set(SESSION) - set(NOT_RUN),
        "gone": (set(SESSION) | set(NOT_RUN)) - found,
    }
    assert not set(SESSION) & set(NOT_RUN)


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Session, list[dict]]]:
    """The README's run command, as written but for the port, in a reader's folder: `monaserve serve
    --random-init --demo` with the admin token `change-me`, watched as a probe would while it starts.
    Yields the session the docs' examples run in, and the readiness answers seen while the demo trained."""
    folder = tmp_path_factory.mktemp("reader")
    (folder / ".venv").symlink_to(Path(sys.prefix))  # the docs call .venv/bin/python, as the README installs it
    (folder / "cat.jpg").write_bytes(image_bytes(7, size=(320, 240)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MONASERVE_ADMIN_TOKEN": TOKEN}
    env.pop("MONASERVE_TOKEN", None)
    server = ServerProcess("random", "var/adapters", "--demo", env={"MONASERVE_ADMIN_TOKEN": TOKEN}, log=folder / "server.log", cwd=folder)
    try:
        seen = server.watch_start(timeout=900)
        env["MONASERVE_URL"] = server.url  # the CLI's default, http://127.0.0.1:8000, on this server's port
        item_keys = list_item_keys(server.client().get("/openapi.json").json()["components"]["schemas"])
        yield Session(folder, server, env, item_keys), seen
    finally:
        server.stop()


@pytest.mark.process
def test_the_readme_server_answers_probes_while_its_demo_trains(readme):
    session, seen = readme
    assert_demo_progress(seen, session.server.log())


@pytest.mark.process
def test_the_demo_adapters_beat_untrained_ones_on_held_out_data(readme):
    """The demo's own training (random backbone, 100 steps each) clearly learns every kind."""
    session, _ = readme
    store = AdapterStore(str(session.folder / "var" / "adapters"))
    gains = {}
    for task in DEMO_TASKS:
        training = store.manifest(task, 1).training
        before, after = training["untrained_evaluation"], training["evaluation"]
        gains[task] = {metric: after[metric] - before[metric] for metric in after}
    assert gains["shapes-classify"]["top1"] >= 0.08, gains
    assert gains["shapes-detect"]["mAP50"] > 0.005, gains
    assert gains["shapes-segment"]["mIoU"] >= 0.15 and gains["shapes-segment"]["pixel_accuracy"] >= 0.3, gains


@pytest.mark.process
def test_the_docs_examples_run_as_written(readme):
    session, _ = readme
    found = every_block()
    for page, language, index in SESSION:
        getattr(session, language)(found[(page, language, index)])


def test_the_flags_table_lists_every_serve_flag():
    """docs/serving.md's table of `monaserve serve` flags names each flag ServeConfig makes, and no other."""
    import argparse

    from monaserve.adapters.config_args import add_config_arguments
    from monaserve.server.config import ServeConfig

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServeConfig)
    flags = {option for action in parser._actions for option in action.option_strings if option.startswith("--") and option != "--help"}
    table = re.search(r"^## Flags and environment variables\n(.*?)^## ", (ROOT / "docs/serving.md").read_text(), re.DOTALL | re.MULTILINE)
    listed = set(re.findall(r"^\| `(--[a-z-]+)`(?:, `(--[a-z-]+)`)?", table.group(1), re.MULTILINE))
    listed = {flag for row in listed for flag in row if flag}
    assert listed == flags, {"missing from the table": flags - listed, "not a flag": listed - flags}
