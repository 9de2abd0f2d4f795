"""Open Inference Protocol requests read into the data plane's terms, and typed results written back as tensors.

Inputs: `image` (BYTES, encoded files) or `pixels` (UINT8, `[N, H, W, 3]` or `[H, W, 3]`). Outputs are
the kind's (`TaskKind.outputs`), all by default; request parameters `top_k` and `min_score` tune classify
and detect; `binary_data_output` (or an output's `binary_data`) returns tensors with the binary extension.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from monaserve.adapters.kinds import MIN_SCORE_RANGE, TOP_K_RANGE, Options, ResultShapeError, TaskKind

from .dataplane import InferResult
from .errors import BadRequest, ResponseTooLarge
from .oip_codec import encode_response, encoded_size, is_integer, output_tensor, parameters_of, read_inputs, short_repr, split_body

MAX_INLINE_VALUES = 4_000_000
"""Most values of one output as JSON numbers (building them is slow); larger outputs must use the binary extension."""


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, list[bytes | np.ndarray]]:
    """The JSON header and the images (run in the decode pool: large bodies must not stall the loop)."""
    header, binary = split_body(body, header_length)
    return header, _images(read_inputs(header, binary))


def _images(inputs: dict) -> list[bytes | np.ndarray]:
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


class OipAnswer:
    """What one request asks of its answer, read from its header once the task's kind is known (`read`,
    before any work runs), and the answer itself: the outputs asked for, inline or binary, each charged
    to the answer's budget before it is encoded."""

    def __init__(self, name: str, header: dict) -> None:
        self.name, self.header = name, header
        self.outputs: list[tuple[str, bool]] = []

    def read(self, kind: TaskKind) -> Options:
        """The request's options, and the outputs to answer with: each a known output of `kind`, asked for
        once (default: all); 400 naming what is wrong."""
        header = self.header
        parameters = parameters_of(header, "the request")
        options = Options(
            top_k=_parameter(parameters, "top_k", int, Options.top_k, *TOP_K_RANGE),
            min_score=_parameter(parameters, "min_score", float, Options.min_score, *MIN_SCORE_RANGE),
        )
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
            what = f"output {output!r}"
            outputs.append((output, _flag(parameters_of(spec, what), "binary_data", binary_default, what)))
        if "id" in header and not isinstance(header["id"], str):
            raise BadRequest(f"'id' must be a string, got {type(header['id']).__name__}")
        self.outputs = outputs
        return options

    def __call__(self, result: InferResult) -> tuple[bytes, dict[str, str]]:
        """The response body and its headers."""
        try:
            tensors = result.kind.output_tensors(result.results)
        except ResultShapeError as exc:
            raise BadRequest(str(exc)) from None
        budget, entries, chunks = result.budget, [], []
        for output, binary in self.outputs:
            tensor = tensors[output]
            if tensor.datatype != "BYTES":  # a fixed size: refuse before the values exist
                count = math.prod(tensor.shape)
                if not binary and count > MAX_INLINE_VALUES:
                    raise ResponseTooLarge(
                        f"the {output!r} output would hold {count} values; the limit as JSON numbers is "
                        f"{MAX_INLINE_VALUES}: ask for it with binary_data (the binary tensor extension)"
                    )
                budget.check(encoded_size(tensor.datatype, None, tensor.shape, binary), f"output {output!r}")
            values = tensor.values()
            budget.charge(encoded_size(tensor.datatype, values, tensor.shape, binary), f"output {output!r}")
            entry, chunk = output_tensor(output, tensor.datatype, values, tensor.shape, binary)
            entries.append(entry)
            chunks.append(chunk)
        response = {"model_name": self.name, "model_version": str(result.version), "outputs": entries}
        if "id" in self.header:
            response["id"] = self.header["id"]
        body, headers = encode_response(response, b"".join(chunks))
        budget.check_total(len(body))
        return body, headers


def _parameter(parameters: dict, name: str, kind: type, default: Any, low: float, high: float) -> Any:
    value = parameters.get(name, default)
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


def _flag(parameters: dict, name: str, default: bool, what: str) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter {name!r} must be true or false; got {short_repr(value)}")
    return value
