"""Regenerate `grpc_service_pb2.py` and `grpc_service_pb2_grpc.py` from `grpc_service.proto` (into `out`,
default this folder), with the service module importing its messages from this package."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
PROTO = "grpc_service.proto"
ABSOLUTE_IMPORT = "import grpc_service_pb2 as grpc__service__pb2"
RELATIVE_IMPORT = "from . import grpc_service_pb2 as grpc__service__pb2"


def generate(out: Path = HERE) -> None:
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", str(HERE / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {HERE / PROTO}")
    service = out / "grpc_service_pb2_grpc.py"
    service.write_text(service.read_text().replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
