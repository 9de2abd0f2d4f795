"""API fuzzing from the OpenAPI schema with schemathesis against a real server: no 5xx, no schema violation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import random_package
from server_harness import TOKEN, ServerProcess

pytestmark = pytest.mark.process

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"
EXAMPLES = 25  # per operation and phase: bounded so CI stays short


@pytest.mark.slow
def test_every_route_and_method_survives_fuzzing(tmp_path, tiny_weights, shared_backbone):
    store = tmp_path / "store"
    for name, kind in [("pets", "classify"), ("boxes", "detect")]:
        random_package(shared_backbone, name, seed=3, kind=kind).save(store / name / "1.safetensors")
    with ServerProcess(tiny_weights, store, env={"MONASERVE_ADMIN_TOKEN": TOKEN}, log=tmp_path / "log") as server:
        schemathesis = Path(sys.executable).with_name("schemathesis")
        run = subprocess.run(
            [
                str(schemathesis),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                "20261123",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert "Traceback" not in server.log()
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    assert run.returncode == 0, run.stdout[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) > 500, summary
    print("fuzz:", generated.group(0))
