"""The gRPC server beside the HTTP one, on the same event loop and data plane: `--grpc-port` on `--host`,
with limits from the same flags (message sizes from --max-request-mb and --max-response-mb, concurrent
calls from --max-connections, bodies in the shared --max-body-buffer-mb), started with the app and
stopped after it drains, in-flight calls finishing within the request timeout."""

from __future__ import annotations

import logging

import grpc
import httpx

from .budgets import BodyBudget
from .dataplane import DataPlane
from .forward import engine_http_client
from .oip_grpc import OipServicer
from .oip_proto.grpc_service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server

log = logging.getLogger(__name__)
MiB = 2**20
HEADROOM = MiB
"""Bytes a response may take beyond --max-response-mb: its message framing, names and shapes."""


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """`inference.GRPCInferenceService` over `plane`. Under `--workers` every front end serves it on the
    shared port (SO_REUSEPORT, as HTTP), and repository calls go to the engine process."""

    def __init__(self, plane: DataPlane, budget: BodyBudget) -> None:
        self.plane, self.budget = plane, budget
        self.server: grpc.aio.Server | None = None
        self.engine: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Listen now (before the backbone loads: ServerLive answers while ServerReady is false); a port
        that cannot be bound fails the start in one line."""
        config, runtime = self.plane.config, self.plane.runtime
        front_end = runtime.admin_socket is not None
        options = [
            ("grpc.max_receive_message_length", int(config.max_request_mb * MiB)),
            ("grpc.max_send_message_length", int(config.max_response_mb * MiB) + HEADROOM),
            ("grpc.so_reuseport", 1 if front_end else 0),
        ]
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_connections)
        self.engine = engine_http_client(runtime.admin_socket) if front_end else None
        add_GRPCInferenceServiceServicer_to_server(OipServicer(self.plane, self.budget, self.engine), self.server)
        address = listen_address(config.host, config.grpc_port)
        try:
            self.server.add_insecure_port(address)
        except RuntimeError:
            raise RuntimeError(f"cannot listen for gRPC on {address}: the port is in use or not allowed; use another --grpc-port") from None
        await self.server.start()
        log.info("gRPC (Open Inference Protocol) on %s", address)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls; those in flight finish within `grace_s`."""
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.engine is not None:
            await self.engine.aclose()
