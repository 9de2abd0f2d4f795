"""Bodies of the Open Inference Protocol's REST routes, as the protocol's text (and Triton's extensions)
define them: for OpenAPI, so that a generated client gets typed models. The routes build the same JSON
(`oip_models.py`, `model_stats.py`, `oip_answer.py`); inference bodies are parsed by `oip_codec.py`, not
by these models (the binary extension's bodies are not JSON alone)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .oip_codec import DTYPES

Datatype = Literal[tuple(DTYPES)]
Parameters = dict[str, bool | int | float | str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 where a dimension varies")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="`image`; `pixels` (UINT8 [N, H, W, 3]) is accepted in its place")
    outputs: list[TensorMetadata]
    parameters: dict[str, str | int] = Field(description="the task's kind, its number of labels, and the alternative input")


class RequestInput(BaseModel):
    name: Literal["image", "pixels"]
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = Field(default=None, description="binary_data_size: its bytes after the JSON header")
    data: list | None = Field(default=None, description="row-major values, flat or nested; BYTES as base64 strings")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(default=None, description="binary_data (bool); classification (int, classify's scores)")


class InferenceRequest(BaseModel):
    """With the binary tensor extension, this JSON is followed by the tensors' bytes
    (`Inference-Header-Content-Length` gives the JSON's length)."""

    id: str | None = None
    parameters: Parameters | None = Field(
        default=None,
        description="top_k, min_score, max_detections, class_agnostic, binary_data_output, timeout (microseconds), priority (0 only)",
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = Field(default=None, description="default: every output of the model's kind")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list | None = Field(default=None, description="absent when the output is binary (binary_data_size in parameters)")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class RepositoryIndexRequest(BaseModel):
    repository_name: str | None = None
    ready: bool = False


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class RepositoryCall(BaseModel):
    """A load's or unload's body: Triton's `config` and `file:` overrides are refused; unloads take `unload_dependents`."""

    parameters: dict[str, bool | int | str] | None = None


class StatisticDuration(BaseModel):
    count: int
    ns: int


class InferStatistics(BaseModel):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class BatchStatistics(BaseModel):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch; 0: never")
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    response_stats: dict[str, dict]
    batch_stats: list[BatchStatistics]
    memory_usage: list[dict]


class ModelStatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics]


class ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]


class ModelConfig(BaseModel):
    """The fields of Triton's model configuration that describe a monaserve model."""

    name: str
    platform: str
    backend: str
    version_policy: dict
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: dict
    instance_group: list[dict]
    parameters: dict[str, dict[str, str]]


BODY_SCHEMAS = (InferenceRequest, RepositoryIndexRequest, RepositoryCall)
"""Request bodies the routes read themselves: documented as components, referenced by the routes."""


def body_components(models: tuple[type[BaseModel], ...] = BODY_SCHEMAS) -> dict[str, dict]:
    """The OpenAPI components of `models` and of the models they hold."""
    components = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components


def body(model: type[BaseModel], required: bool = True) -> dict:
    """An `openapi_extra` request body of `model` (a component of `BODY_SCHEMAS`)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}
