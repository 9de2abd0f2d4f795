"""Messages between front ends and the engine: head outputs survive the trip exactly, and a message
that does not follow the format is refused rather than trusted."""

from __future__ import annotations

import asyncio

import pytest
import torch

from monaserve.server.ipc import PREFIX, ProtocolError, pack_outputs, read_message, unpack_outputs, write_message

OUTPUTS = [
    torch.rand(1000),  # classify probabilities
    {"boxes": torch.rand(3, 4), "scores": torch.rand(3), "labels": torch.tensor([1, 0, 2])},  # detect
    {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},  # nothing found
    torch.randint(0, 5, (64, 48), dtype=torch.int32),  # segment class ids
]


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_head_outputs_cross_exactly_through_a_socket_pair():
    async def trip() -> list:
        received: asyncio.Queue = asyncio.Queue()

        async def serve(reader, writer):
            received.put_nowait(await read_message(reader))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        specs, payload = pack_outputs(OUTPUTS)
        write_message(writer, {"id": 7, "outputs": specs}, payload)
        await writer.drain()
        header, body = await received.get()
        writer.close()
        server.close()
        return unpack_outputs(header["outputs"], body)

    assert all(same(a, b) for a, b in zip(asyncio.run(trip()), OUTPUTS))


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s[0]["tensor"].update(dtype="object"),
        lambda s: s[0]["tensor"].update(nbytes=s[0]["tensor"]["nbytes"] + 4),
        lambda s: s[0]["tensor"].update(offset=10**9),
        lambda s: s[0]["tensor"].update(shape=[-1]),
        lambda s: s.append({"pickle": "cos\nsystem\n"}),
    ],
)
def test_a_description_that_does_not_fit_the_payload_is_refused(change):
    specs, payload = pack_outputs(OUTPUTS)
    change(specs)
    with pytest.raises(ProtocolError):
        unpack_outputs(specs, payload)


def test_a_header_over_the_limit_is_refused_before_it_is_read():
    async def read() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(PREFIX.pack(2**31, 0))
        await read_message(reader)

    with pytest.raises(ProtocolError, match="over the limits"):
        asyncio.run(read())
