"""Messages between front-end processes and the engine process over a Unix socket: a JSON header and
raw tensor bytes, length-prefixed.

Images travel in shared memory (`shm_arena`): a message names their regions. What the engine answers
(probabilities, boxes, class maps: kilobytes) travels in the message itself. Both ends are this
server's own processes, but a message is still checked as it is read: no pickle, a bounded header,
tensors only of the dtypes heads produce, and every byte range inside the payload.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from typing import Any

import torch

PREFIX = struct.Struct(">II")
"""Header bytes, then payload bytes."""
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")}

HeadOutput = torch.Tensor | dict[str, torch.Tensor]


class ProtocolError(ValueError):
    """A message that does not follow this module's format."""


async def read_message(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    """The next message's header and payload; `asyncio.IncompleteReadError` at the end of the stream."""
    header_bytes, payload_bytes = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if header_bytes > MAX_HEADER_BYTES or payload_bytes > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"a message of {header_bytes} + {payload_bytes} bytes is over the limits")
    try:
        header = json.loads(await reader.readexactly(header_bytes))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both
        raise ProtocolError(f"a message header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("a message header must be a JSON object")
    return header, await reader.readexactly(payload_bytes)


def write_message(writer: asyncio.StreamWriter, header: dict, payload: bytes = b"") -> None:
    """Queue one message on `writer` (the caller drains)."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    writer.write(PREFIX.pack(len(encoded), len(payload)) + encoded + payload)


def pack_outputs(outputs: list[HeadOutput]) -> tuple[list[Any], bytes]:
    """Head outputs (host tensors, or dicts of them) as a JSON-able description and the bytes it points into."""
    chunks: list[bytes] = []
    offset = 0

    def pack(tensor: torch.Tensor) -> dict:
        nonlocal offset
        data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        spec = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
        return spec

    specs = [{"fields": {k: pack(v) for k, v in o.items()}} if isinstance(o, dict) else {"tensor": pack(o)} for o in outputs]
    return specs, b"".join(chunks)


def unpack_outputs(specs: list[Any], payload: bytes) -> list[HeadOutput]:
    """The inverse of `pack_outputs`, checking every description against the payload."""

    def unpack(spec: dict) -> torch.Tensor:
        dtype = DTYPES.get(spec.get("dtype"))
        shape, offset, nbytes = spec.get("shape"), spec.get("offset"), spec.get("nbytes")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ProtocolError(f"bad tensor description {spec!r}")
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes != expected or not isinstance(offset, int) or offset < 0 or offset + nbytes > len(payload):
            raise ProtocolError(f"tensor bytes {offset}+{nbytes} do not fit shape {shape} or the payload")
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(payload[offset : offset + nbytes]), dtype=torch.uint8).view(dtype).view(shape)

    if not isinstance(specs, list):
        raise ProtocolError("outputs must be a list")
    outputs: list[HeadOutput] = []
    for spec in specs:
        if isinstance(spec, dict) and isinstance(spec.get("tensor"), dict):
            outputs.append(unpack(spec["tensor"]))
        elif isinstance(spec, dict) and isinstance(spec.get("fields"), dict):
            outputs.append({str(k): unpack(v) for k, v in spec["fields"].items()})
        else:
            raise ProtocolError(f"bad output description {spec!r}")
    return outputs
