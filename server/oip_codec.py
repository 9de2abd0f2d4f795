"""Tensors of the Open Inference Protocol v2 (KServe/Triton) over HTTP: JSON data and the binary extension.

A request may carry tensor data inline in JSON or, with the binary tensor extension, after the JSON
header (`Inference-Header-Content-Length` gives its length; each input's `binary_data_size` its share).
BYTES elements are strings in JSON (here: base64 of the encoded image) and length-prefixed (4-byte
little-endian) in binary. Every problem is a `BadRequest` naming the tensor.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np

from .errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8
MAX_ELEMENTS = 2**31
"""Bounds on an input's shape, checked before anything is counted or allocated by it."""
DTYPES: dict[str, type | None] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": None,
}


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header and what follows it (binary tensor data; empty without the extension)."""
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:length])
    except RecursionError:
        raise BadRequest("the inference request's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    return header, memoryview(body)[length:]


def read_inputs(header: dict, binary: memoryview) -> dict[str, tuple[str, list[int], np.ndarray | list[bytes]]]:
    """Each input by name: (datatype, shape, values) — a numpy array, or a list of bytes for BYTES."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the inference request needs a non-empty 'inputs' list")
    found, offset = {}, 0
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("every input needs a 'name'")
        name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise BadRequest(f"input {name!r}: unknown datatype {short_repr(datatype)}; use one of {', '.join(DTYPES)}")
        count = element_count(name, shape)
        size = parameters_of(spec, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not is_integer(size) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {short_repr(size)} runs past the end of the body")
            chunk, offset = binary[offset : offset + size], offset + size
            values = binary_values(name, datatype, chunk, count)
        elif "data" in spec:
            values = _json_values(name, datatype, spec["data"], shape)
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        found[name] = (datatype, shape, values if datatype == "BYTES" else values.reshape(shape))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return found


def version_number(version: str | None) -> int | None:
    """A model version as the protocol writes it (a string), read as a number; None or empty: none."""
    if not version:
        return None
    if not (version.isascii() and version.isdigit() and len(version) <= 10) or int(version) < 1:
        raise BadRequest(f"model versions are positive integers, got {short_repr(version)}")
    return int(version)


def element_count(name: str, shape: Any) -> int:
    """The elements of a tensor of `shape`, once `shape` is checked: a list of at most `MAX_RANK`
    non-negative integers whose product, zeros taken as ones, is at most `MAX_ELEMENTS` (checked as it is
    multiplied; an empty tensor with huge other dimensions is no tensor numpy can shape)."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(is_integer(d) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} non-negative integers")
    count, extent = 1, 1
    for dimension in shape:
        count *= min(dimension, MAX_ELEMENTS + 1)
        extent *= min(max(dimension, 1), MAX_ELEMENTS + 1)
        if extent > MAX_ELEMENTS:
            raise BadRequest(f"input {name!r}: shape {short_repr(shape)} has more than {MAX_ELEMENTS} elements (zeros taken as ones)")
    return count


def is_integer(value: Any) -> bool:
    """A JSON integer (Python's `bool` is an `int`, JSON's `true` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parameters_of(spec: dict, what: str) -> dict:
    """`spec["parameters"]`: a JSON object, or empty when absent."""
    parameters = spec.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{what}: 'parameters' must be a JSON object, got {type(parameters).__name__}")
    return parameters


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters, for error messages about values a client sent."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_values(name: str, datatype: str, data: Any, shape: list[int]) -> np.ndarray | list[bytes]:
    flat = _flatten(name, data, max_depth=max(1, len(shape)))
    count = math.prod(shape)
    if len(flat) != count:
        raise BadRequest(f"input {name!r}: {len(flat)} values for a shape of {count} elements")
    if datatype == "BYTES":
        try:
            return [base64.b64decode(v, validate=True) for v in flat]
        except (binascii.Error, ValueError, TypeError):
            raise BadRequest(f"input {name!r}: BYTES elements in JSON must be base64 strings") from None
    try:
        return np.asarray(flat, dtype=DTYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"input {name!r}: values are not {datatype}") from None


def binary_values(name: str, datatype: str, chunk: memoryview, count: int) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        values, position = [], 0
        while position < len(chunk):
            if position + 4 > len(chunk):
                raise BadRequest(f"input {name!r}: truncated BYTES length prefix")
            (length,) = struct.unpack_from("<I", chunk, position)
            if position + 4 + length > len(chunk):
                raise BadRequest(f"input {name!r}: a BYTES element runs past its binary data")
            values.append(bytes(chunk[position + 4 : position + 4 + length]))
            position += 4 + length
        if len(values) != count:
            raise BadRequest(f"input {name!r}: {len(values)} BYTES elements for a shape of {count}")
        return values
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: {len(chunk)} bytes of binary data for {count} {datatype} values")
    return np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="))


def _flatten(name: str, data: Any, max_depth: int) -> list:
    """Row-major values of `data`, flat or nested no deeper than the tensor's rank."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list")
    level, depth = data, 1
    while level and any(isinstance(item, list) for item in level):
        if depth >= max_depth or not all(isinstance(item, list) for item in level):
            raise BadRequest(f"input {name!r}: 'data' is nested deeper than its shape or unevenly")
        level, depth = [value for item in level for value in item], depth + 1
    return level


def encode_bytes(values: list[bytes]) -> bytes:
    """BYTES elements in the binary extension's layout: each one prefixed by its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def output_tensor(name: str, datatype: str, values: np.ndarray | list[str], shape: list[int], binary: bool) -> tuple[dict, bytes]:
    """One response output: its JSON entry, and its binary data when `binary` (else the data is inline)."""
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if datatype == "BYTES":
        flat = [str(v) for v in values]
        if binary:
            data = encode_bytes([v.encode() for v in flat])
            entry["parameters"] = {"binary_data_size": len(data)}
            return entry, data
        entry["data"] = flat
        return entry, b""
    array = np.ascontiguousarray(values, dtype=DTYPES[datatype])
    if binary:
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(data)}
        return entry, data
    entry["data"] = array.reshape(-1).tolist()
    return entry, b""


INLINE_CHARACTERS = {"BOOL": 6, "UINT8": 4, "UINT16": 6, "UINT32": 11, "UINT64": 21, "INT8": 5, "INT16": 7, "INT32": 12, "INT64": 21}
"""Most characters one element takes as a JSON number, with its comma (floats: `FLOAT_CHARACTERS`)."""
FLOAT_CHARACTERS = 25


def encoded_size(datatype: str, values: np.ndarray | list[str] | None, shape: list[int], binary: bool) -> int:
    """Bytes an output will take in the answer: exact in binary, at most this as JSON. `values` is
    needed only for BYTES, whose elements vary in length."""
    if datatype == "BYTES":
        return sum(len(str(v).encode()) + (4 if binary else 8) for v in values)  # length prefix, or quotes, escapes, comma
    count = math.prod(shape)
    if binary:
        return count * np.dtype(DTYPES[datatype]).itemsize
    return count * INLINE_CHARACTERS.get(datatype, FLOAT_CHARACTERS)


def encode_response(header: dict, binary: bytes) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: plain JSON, or JSON then binary data with the extension's header."""
    text = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return text, {"content-type": "application/json"}
    return text + binary, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
