"""Open Inference Protocol messages over gRPC, read into the same terms as REST's JSON: a request header
(`id`, `parameters`, `outputs`) that `OipAnswer` reads, inputs as `oip_codec.read_inputs` returns them,
and an answer's tensors written back as `raw_output_contents`.

An input's data is in `raw_input_contents` (for every input or none; BYTES elements length-prefixed as
in the binary extension) or in the typed field of its datatype in `contents`. Every problem is a
`BadRequest` naming the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from .errors import BadRequest
from .oip_codec import DTYPES, binary_values, element_count, short_repr
from .oip_proto import grpc_service_pb2 as pb

CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The field of `InferTensorContents` that holds each datatype (FP16 has none: it travels raw)."""


def parameters(fields: Any) -> dict[str, Any]:
    """A map of `InferParameter` (or `ModelRepositoryParameter`) as plain values; one that is unset is left out."""
    values = {}
    for key, parameter in fields.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is not None:
            values[key] = getattr(parameter, which)
    return values


def request_header(request: pb.ModelInferRequest) -> dict:
    """What REST reads from its JSON header, read from `request`."""
    header: dict[str, Any] = {
        "parameters": parameters(request.parameters),
        "outputs": [{"name": output.name, "parameters": parameters(output.parameters)} for output in request.outputs],
    }
    if request.id:
        header["id"] = request.id
    return header


def read_inputs(request: pb.ModelInferRequest) -> dict[str, tuple[str, list[int], np.ndarray | list[bytes]]]:
    """Each input by name: (datatype, shape, values), as `oip_codec.read_inputs` gives them."""
    if not request.inputs:
        raise BadRequest("the inference request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in their order")
    found = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if datatype not in DTYPES:
            raise BadRequest(f"input {name!r}: unknown datatype {short_repr(datatype)}; use one of {', '.join(DTYPES)}")
        if name in found:
            raise BadRequest(f"input {name!r} is sent twice")
        count = element_count(name, shape)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {name!r} has both contents and raw_input_contents; send one")
            values = binary_values(name, datatype, memoryview(raw[index]), count)
        else:
            values = _typed_values(name, datatype, tensor.contents, count)
        found[name] = (datatype, shape, values if datatype == "BYTES" else values.reshape(shape))
    return found


def _typed_values(name: str, datatype: str, contents: pb.InferTensorContents, count: int) -> np.ndarray | list[bytes]:
    field = CONTENTS.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequest(f"input {name!r}: {len(values)} values in contents.{field} for a shape of {count} elements")
    if datatype == "BYTES":
        return list(values)
    wide = np.asarray(values)
    array = wide.astype(DTYPES[datatype])
    if array.dtype.kind in "iu" and not np.array_equal(array, wide):
        raise BadRequest(f"input {name!r}: values do not fit {datatype}")
    return array


def infer_response(name: str, version: int, request_id: str, tensors: list[tuple[dict, bytes]]) -> pb.ModelInferResponse:
    """The answer: each output's name, datatype and shape, its data in `raw_output_contents`."""
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request_id)
    for entry, data in tensors:
        response.outputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        response.raw_output_contents.append(data)
    return response


def message_from(value: dict | list, message: type[Message], field: str | None = None) -> Message:
    """`message` filled from the JSON-shaped `value` REST answers with (`field`: the message field it fills)."""
    return json_format.ParseDict(value if field is None else {field: value}, message(), ignore_unknown_fields=True)
