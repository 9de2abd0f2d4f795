"""The Open Inference Protocol over gRPC (KServe v2 / Triton `inference.GRPCInferenceService`).

A translator over the same data plane as the `/v2` REST routes (`oip.py`): the same limits, answers
and errors (each `ServeError` as the gRPC status its HTTP status maps to, with the same text), the
same metrics (`protocol="grpc"`) and the same batches. Requests are read into REST's terms by
`oip_grpc_codec.py`; metadata, configuration, statistics and the repository come from the same dicts
REST answers with (`oip_models.py`, `model_stats.py`, `oip_repository.py`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import grpc
import httpx

from monaserve.adapters import AdapterError

from .auth import bearer_credentials, check_admin, check_api
from .budgets import BodyBudget
from .dataplane import Asked, DataPlane, InferRequest, InferResult
from .errors import BodyBudgetFull, ServeError, status_of
from .model_stats import model_statistics
from .oip_answer import OipAnswer, images_of
from .oip_codec import version_number
from .oip_grpc_codec import infer_response, message_from, parameters, read_inputs, request_header
from .oip_models import model_metadata, server_metadata
from .oip_proto import grpc_service_pb2 as pb
from .oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceServicer
from .oip_repository import EngineRepository, LocalRepository, Repository

log = logging.getLogger(__name__)
T = TypeVar("T")
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""Each HTTP status a `ServeError` carries, as a gRPC status (anything else: INTERNAL)."""


Access = Literal["public", "api", "admin"]
ACCESS: dict[Access, Callable | None] = {"public": None, "api": check_api, "admin": check_admin}
"""Who may call: anyone (health and server metadata, as on REST), holders of the API token when the
server has one (models and inference), holders of the admin token (the repository)."""


def rpc(access: Access = "api") -> Callable:
    """An RPC: its token checked as `access` says, every error answered as its gRPC status with the REST
    error's text (and `retry-after` as trailing metadata), an unexpected one logged."""
    check = ACCESS[access]

    def wrap(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(method)
        async def handler(self: OipServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
            try:
                if check is not None:
                    check(self.plane.config, bearer_credentials(dict(context.invocation_metadata()).get("authorization")))
                return await method(self, request, context)
            except ServeError as exc:
                await abort(context, exc.status, f"{exc.code}: {exc.message}", exc.retry_after_s)
            except AdapterError as exc:
                await abort(context, 422, f"invalid_adapter: {exc}")
            except Exception as exc:
                log.exception("unhandled error in %s", method.__name__)
                await abort(context, 500, f"internal: internal error: {type(exc).__name__}")

        return handler

    return wrap


async def abort(context: grpc.aio.ServicerContext, status: int, message: str, retry_after_s: int | None = None) -> None:
    """End the call with the gRPC status that HTTP `status` maps to."""
    if retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(retry_after_s)),))
    await context.abort(CODES.get(status, grpc.StatusCode.INTERNAL), message)


class OipServicer(GRPCInferenceServiceServicer):
    """The service's RPCs over one data plane. `budget` is the one request bodies share with HTTP;
    `engine` (a front end under `--workers`) is the engine process's HTTP client, for the repository."""

    def __init__(self, plane: DataPlane, budget: BodyBudget, engine: httpx.AsyncClient | None = None) -> None:
        self.plane, self.budget, self.engine = plane, budget, engine

    # ---- health and metadata ------------------------------------------------------------------

    @rpc("public")
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("public")
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.plane.model_ready(request.name, version_number(request.version)))

    @rpc("public")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return message_from(server_metadata(), pb.ServerMetadataResponse)

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        target = await self.plane.servable(request.name, version_number(request.version))
        return message_from(model_metadata(target), pb.ModelMetadataResponse)

    @rpc()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        config = await self.plane.model_config(request.name, version_number(request.version))
        return message_from(config, pb.ModelConfigResponse, "config")

    @rpc()
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        models = await self.plane.stats_models(request.name or None, version_number(request.version))
        return message_from(model_statistics(self.plane.metrics, models), pb.ModelStatisticsResponse)

    # ---- inference ----------------------------------------------------------------------------

    @rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        status = 500
        try:
            response = await self._infer(request, context)
            status = 200
            return response
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            self.plane.count_request(request.model_name, "grpc", status)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """Within the body budget HTTP bodies share (the message is in memory already: held until answered)."""
        size = request.ByteSize()
        if not self.budget.take(size):
            held = f"request bodies held at once would exceed {self.budget.capacity} bytes ({self.budget.name})"
            raise BodyBudgetFull(f"{held} with this one ({size} bytes); retry shortly", retry_after_s=1)
        try:
            loop = asyncio.get_running_loop()
            header, images = await loop.run_in_executor(self.plane.runtime.decode_pool, read_request, request)
            name, version = request.model_name, version_number(request.model_version)
            answer = OipAnswer(name, header, raw=True)
            client_deadline = context.time_remaining()
            started = time.monotonic()

            def read_asked(kind) -> Asked:  # the client's gRPC deadline is a timeout too
                asked = answer.read(kind)
                if client_deadline is None:
                    return asked
                left = max(0.0, client_deadline - (time.monotonic() - started))
                return Asked(asked.options, left if asked.timeout_s is None else min(asked.timeout_s, left))

            def render(result: InferResult) -> pb.ModelInferResponse:
                tensors = answer.tensors(result)
                result.budget.check_total(sum(len(data) for _, data in tensors))
                return infer_response(name, result.version, request.id, tensors)

            return await self.plane.infer(InferRequest(name, images, version), render, read_asked=read_asked)
        finally:
            self.budget.give(size)

    # ---- the model repository extension --------------------------------------------------------

    @rpc("admin")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        return message_from(await self._repository(context).index(request.ready), pb.RepositoryIndexResponse, "models")

    @rpc("admin")
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._repository(context).load(request.model_name, parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc("admin")
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._repository(context).unload(request.model_name, parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    def _repository(self, context: grpc.aio.ServicerContext) -> Repository:
        if self.engine is None:
            return LocalRepository(self.plane)
        return EngineRepository(self.engine, dict(context.invocation_metadata()).get("authorization"))


def read_request(request: pb.ModelInferRequest) -> tuple[dict, list]:
    """The header and the images of `request` (in the decode pool: converting contents is CPU work)."""
    return request_header(request), images_of(read_inputs(request))
