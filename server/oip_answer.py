"""Open Inference Protocol requests read into the data plane's terms, and typed results written back as tensors.

Inputs: `image` (BYTES, encoded files) or `pixels` (UINT8, `[N, H, W, 3]` or `[H, W, 3]`). Outputs are
the kind's (`TaskKind.outputs`), all by default; request parameters `top_k` (classify), `min_score`,
`max_detections` and `class_agnostic` (detect) tune the results, `timeout` (microseconds) shortens the
deadline; `binary_data_output` (or an output's `binary_data`) returns tensors with the binary extension,
and an output's `classification` (the classification extension) returns a classify model's scores as
"score:index:label" strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from monaserve.adapters.kinds import MAX_DETECTIONS_RANGE, MIN_SCORE_RANGE, TOP_K_RANGE, Options, OutputTensor, ResultShapeError, TaskKind

from .dataplane import Asked, InferResult
from .errors import BadRequest, ResponseTooLarge
from .oip_codec import encode_response, encoded_size, is_integer, output_tensor, parameters_of, read_inputs, short_repr, split_body

MAX_INLINE_VALUES = 4_000_000
"""Most values of one output as JSON numbers (building them is slow); larger outputs must use the binary extension."""


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, list[bytes | np.ndarray]]:
    """The JSON header and the images (run in the decode pool: large bodies must not stall the loop)."""
    header, binary = split_body(body, header_length)
    return header, images_of(read_inputs(header, binary))


def images_of(inputs: dict) -> list[bytes | np.ndarray]:
    """The request's images from its one input: `image` (BYTES) or `pixels` (UINT8 HWC)."""
    if len(inputs) != 1 or not inputs.keys() <= {"image", "pixels"}:
        raise BadRequest(f"send exactly one input, 'image' (BYTES) or 'pixels' (UINT8); got {sorted(inputs)}")
    ((name, (datatype, shape, values)),) = inputs.items()
    if name == "image":
        if datatype != "BYTES" or len(shape) != 1:
            raise BadRequest(f"input 'image' must be BYTES of shape [N]; got {datatype} {shape}")
        images = list(values)
    else:
        if datatype != "UINT8" or len(shape) not in (3, 4) or shape[-1] != 3:
            raise BadRequest(f"input 'pixels' must be UINT8 of shape [N, H, W, 3] or [H, W, 3]; got {datatype} {shape}")
        images = list(values) if len(shape) == 4 else [values]
    if not images:
        raise BadRequest("the request holds no image")
    return images


REQUEST_PARAMETERS = ("top_k", "min_score", "max_detections", "class_agnostic", "binary_data_output", "timeout", "priority")
OUTPUT_PARAMETERS = ("binary_data", "classification")
CLASSIFIED_OUTPUT = "scores"
"""The output the classification extension applies to: a classify model's scores, best first."""
US = 1e-6


@dataclass(frozen=True)
class AskedOutput:
    """One output an answer holds: binary or inline, and as `classes` "score:index:label" strings (0: as itself)."""

    name: str
    binary: bool
    classes: int = 0


class OipAnswer:
    """What one request asks of its answer, read from its header once the task's kind is known (`read`,
    before any work runs), and the answer itself: the outputs asked for, inline or binary, each charged
    to the answer's budget before it is encoded. `raw` answers every output as raw bytes (gRPC's
    `raw_output_contents`), whatever the request says."""

    def __init__(self, name: str, header: dict, raw: bool = False) -> None:
        self.name, self.header, self.raw = name, header, raw
        self.outputs: list[AskedOutput] = []

    def read(self, kind: TaskKind) -> Asked:
        """The request's options and deadline, and the outputs to answer with: each a known output of
        `kind`, asked for once (default: all); 400 naming what is wrong."""
        header = self.header
        parameters = parameters_of(header, "the request")
        _only_known(parameters, REQUEST_PARAMETERS, "the request")
        if parameters.get("priority", 0) != 0:
            raise BadRequest("parameter 'priority': every request has the same priority here; leave it out (or 0)")
        timeout_us = _parameter(parameters, "timeout", int, 0, 0, 2**63)  # microseconds, as Triton's; 0: the server's
        binary_default = _flag(parameters, "binary_data_output", False, "the request")
        requested = header.get("outputs") or None  # absent, null or empty: every output
        if requested is not None and not isinstance(requested, list):
            raise BadRequest("'outputs' must be a list")
        names = [output.name for output in kind.outputs]
        outputs, seen = [], set()
        for spec in requested or [{"name": name} for name in names]:
            output = spec.get("name") if isinstance(spec, dict) else None
            if not isinstance(output, str) or output not in names:
                raise BadRequest(f"unknown output {short_repr(output)}; {kind.name} models give {names}")
            if output in seen:
                raise BadRequest(f"output {output!r} is requested twice; ask for each output once")
            seen.add(output)
            asked = _asked_output(kind, output, parameters_of(spec, f"output {output!r}"), binary_default)
            outputs.append(replace(asked, binary=True) if self.raw else asked)
        if "id" in header and not isinstance(header["id"], str):
            raise BadRequest(f"'id' must be a string, got {type(header['id']).__name__}")
        self.outputs = outputs
        top_k = _parameter(parameters, "top_k", int, Options.top_k, *TOP_K_RANGE)
        options = Options(
            top_k=max([top_k] + [o.classes for o in outputs]),
            min_score=_parameter(parameters, "min_score", float, Options.min_score, *MIN_SCORE_RANGE),
            max_detections=_parameter(parameters, "max_detections", int, Options.max_detections, *MAX_DETECTIONS_RANGE),
            class_agnostic=_flag(parameters, "class_agnostic", Options.class_agnostic, "the request"),
        )
        return Asked(options, timeout_us * US if timeout_us else None)

    def tensors(self, result: InferResult) -> list[tuple[dict, bytes]]:
        """Each output asked for: its JSON entry, and its binary data when it is binary (else the data is
        inline), each charged to the answer's budget before its values are built."""
        try:
            tensors = result.kind.output_tensors(result.results)
        except ResultShapeError as exc:
            raise BadRequest(str(exc)) from None
        budget, encoded = result.budget, []
        for output in self.outputs:
            tensor = tensors[output.name] if not output.classes else classification(tensors, output.classes)
            if tensor.datatype != "BYTES":  # a fixed size: refuse before the values exist
                count = math.prod(tensor.shape)
                if not output.binary and count > MAX_INLINE_VALUES:
                    raise ResponseTooLarge(
                        f"the {output.name!r} output would hold {count} values; the limit as JSON numbers is "
                        f"{MAX_INLINE_VALUES}: ask for it with binary_data (the binary tensor extension)"
                    )
                budget.check(encoded_size(tensor.datatype, None, tensor.shape, output.binary), f"output {output.name!r}")
            values = tensor.values()
            budget.charge(encoded_size(tensor.datatype, values, tensor.shape, output.binary), f"output {output.name!r}")
            encoded.append(output_tensor(output.name, tensor.datatype, values, tensor.shape, output.binary))
        return encoded

    def __call__(self, result: InferResult) -> tuple[bytes, dict[str, str]]:
        """The REST response body and its headers."""
        encoded = self.tensors(result)
        response = {"model_name": self.name, "model_version": str(result.version), "outputs": [entry for entry, _ in encoded]}
        if "id" in self.header:
            response["id"] = self.header["id"]
        body, headers = encode_response(response, b"".join(chunk for _, chunk in encoded))
        result.budget.check_total(len(body))
        return body, headers


def classification(tensors: dict[str, OutputTensor], classes: int) -> OutputTensor:
    """The classification extension's form of the scores: the best `classes` of each image as
    "score:index:label" strings, best first (`[N, classes]`, fewer where a model has fewer labels)."""
    scores, labels, indices = (tensors[name] for name in ("scores", "labels", "indices"))
    count, width = scores.shape
    shown = min(classes, width)

    def values() -> list[str]:
        rows, flat_labels = zip(scores.values(), indices.values()), labels.values()
        return [
            f"{score:f}:{index}:{flat_labels[i * width + j]}"
            for i, (row, row_indices) in enumerate(rows)
            for j, (score, index) in enumerate(zip(row[:shown], row_indices[:shown]))
        ]

    return OutputTensor("BYTES", [count, shown], values)


def _asked_output(kind: TaskKind, output: str, parameters: dict, binary_default: bool) -> AskedOutput:
    what = f"output {output!r}"
    _only_known(parameters, OUTPUT_PARAMETERS, what)
    classes = 0
    if parameters.get("classification", 0) != 0:
        if kind.name != "classify" or output != CLASSIFIED_OUTPUT:
            raise BadRequest(f"{what}: 'classification' applies to the {CLASSIFIED_OUTPUT!r} output of classify models")
        classes = _parameter(parameters, "classification", int, 0, *TOP_K_RANGE)
    return AskedOutput(output, _flag(parameters, "binary_data", binary_default, what), classes)


def _only_known(parameters: dict, known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise BadRequest(f"{what}: unknown parameter {short_repr(unknown[0])}; the parameters are {', '.join(known)}")


def _parameter(parameters: dict, name: str, kind: type, default: Any, low: float, high: float) -> Any:
    if name not in parameters:
        return default
    value = parameters[name]
    if is_integer(value):
        valid = low <= value <= high  # exact for integers of any length (no float conversion)
    elif isinstance(value, float):
        valid = math.isfinite(value) and (kind is float or value.is_integer()) and low <= value <= high
    else:
        valid = False
    if not valid:
        wanted = "an integer" if kind is int else "a number"
        raise BadRequest(f"parameter {name!r} must be {wanted} in {low:g}..{high:g}; got {short_repr(value)}")
    return kind(value)


def _flag(parameters: dict, name: str, default: bool | None, what: str) -> bool | None:
    if name not in parameters:
        return default
    value = parameters[name]
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter {name!r} must be true or false; got {short_repr(value)}")
    return value
