"""Compressed request bodies (`Content-Encoding: gzip` or `deflate`), decompressed as they arrive and never
past a limit: a small body that would inflate beyond it (a zip bomb) is refused as soon as it does."""

from __future__ import annotations

import asyncio
import zlib

from .errors import BadRequest, PayloadTooLarge, UnsupportedMedia

WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}
"""zlib's framing of each encoding: gzip's header and trailer, or deflate's zlib wrapper (RFC 9110)."""
SLICE = 2**20
"""Most bytes one step of decompression makes before the event loop gets a turn."""


def body_decoder(encoding: bytes | None, limit: int, limit_name: str = "the request body limit") -> BodyDecoder | None:
    """The decoder for a request's `Content-Encoding` (None: identity); 415 for one it cannot read.
    `limit_name` says what sets `limit` (a flag), for the 413."""
    name = (encoding or b"identity").decode("latin-1").strip().lower()
    if name == "identity":
        return None
    if name not in WINDOW_BITS:
        raise UnsupportedMedia(f"unsupported Content-Encoding {name!r}; send the body as gzip, deflate or identity")
    return BodyDecoder(name, limit, limit_name)


class BodyDecoder:
    """One body's decompressor: `feed` each part as it arrives; 413 once the body would inflate past
    `limit` bytes, 400 for a stream that is corrupt, truncated or followed by other bytes."""

    def __init__(self, encoding: str, limit: int, limit_name: str = "the request body limit") -> None:
        self.encoding, self.limit, self.limit_name = encoding, limit, limit_name
        self.produced = 0
        self._zlib = zlib.decompressobj(WINDOW_BITS[encoding])

    async def feed(self, chunk: bytes, final: bool) -> bytes:
        """The decompressed bytes of `chunk`, made a slice at a time (the loop runs in between)."""
        parts, data, room = [], chunk, 0
        try:
            while data or parts and len(parts[-1]) == room and not self._zlib.eof:  # a full slice may leave output in zlib
                if self._zlib.eof:
                    raise BadRequest(f"the request body holds bytes after its {self.encoding} stream ends")
                room = min(SLICE, self.limit - self.produced + 1)
                part = self._zlib.decompress(data, room)
                self.produced += len(part)
                if self.produced > self.limit:
                    raise PayloadTooLarge(f"the {self.encoding} request body inflates past {self.limit} bytes ({self.limit_name})")
                parts.append(part)
                data = self._zlib.unconsumed_tail
                await asyncio.sleep(0)
        except zlib.error as exc:
            raise BadRequest(f"the request body is not valid {self.encoding}: {exc}") from None
        if self._zlib.unused_data:
            raise BadRequest(f"the request body holds bytes after its {self.encoding} stream ends")
        if final and not self._zlib.eof:
            raise BadRequest(f"the request body's {self.encoding} stream is truncated")
        return b"".join(parts)
