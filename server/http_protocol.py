"""uvicorn's HTTP/1.1 protocols (httptools and h11) with the guards they lack: deadlines for clients that stall, and a connection cap.

uvicorn waits for a request's headers forever, and a client that trickles a byte now and then keeps
its connection (and a file descriptor) as long as it likes. Here, as nginx and Envoy do:

- a new connection must deliver its first request's headers within `header_timeout_s`, and on a
  kept-alive connection the headers of the next request are due that long after their first byte;
- a kept-alive connection with no request on it closes after `keep_alive_s`;
- a body answered before it was read (a 401 to an upload, say) must finish arriving within
  `body_timeout_s`, or the connection closes;
- past `max_connections` open connections, a new connection first makes room by closing the longest
  idle kept-alive one (as nginx does); with none idle, its request is answered 503 with Retry-After
  and it is closed. Past `hard_max_connections` (kept below the descriptor limit) a new connection is
  closed at once, so the process keeps descriptors for its own work.

Bodies being read by the app have their own deadlines (`middleware.BodyGuard`).
"""

from __future__ import annotations

import asyncio
import http
import json
from dataclasses import dataclass
from typing import Any, Literal

import h11
import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

Phase = Literal["head", "idle", "drain"]
Reading = Literal["nothing", "head", "body"]
"""Where the client is in sending its request: between requests, partway through a request's head, or its body."""


@dataclass(frozen=True)
class ConnectionRules:
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    max_connections: int
    hard_max_connections: int
    headers: tuple[tuple[str, str], ...] = ()
    """Added to the answers written here (they never reach the app): the replica header."""


class ConnectionGuard:
    """The deadlines and cap of the module docstring, over one of uvicorn's HTTP protocols; the parser's
    own subclass says how far the client has got (`_reading`) and refuses a request over the cap (`_refuse`)."""

    rules: ConnectionRules
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set
    cycle: Any

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        rules: ConnectionRules,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)  # the parser's protocol, next in the MRO
        self.rules = rules
        self._timer: asyncio.TimerHandle | None = None
        self._armed: Phase | None = None
        self._armed_at = 0.0
        self._refusing = False

    def _reading(self) -> Reading | None:
        """How far the client has got with its next request; None when no deadline of ours applies."""
        raise NotImplementedError

    def _refuse(self, data: bytes) -> None:
        """Over the connection cap: answer the first request with 503 as soon as its headers are in."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_connections = len(self.connections)
        if open_connections > self.rules.hard_max_connections:
            transport.close()
            return
        if open_connections > self.rules.max_connections:
            self._refusing = not self._close_an_idle_connection()
        self._track()

    def _close_an_idle_connection(self) -> bool:
        """Close the kept-alive connection idle the longest, if there is one (nginx does the same)."""
        idle = [c for c in self.connections if isinstance(c, ConnectionGuard) and c._armed == "idle" and c is not self]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._armed_at)
        oldest._disarm()
        oldest.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            self._refuse(data)
            return
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def _phase(self) -> Phase | None:
        """Which deadline applies now: the client owes headers, or the rest of an answered body, or the
        connection is kept alive with nothing on it; None while the app has a request."""
        if self.transport.is_closing():
            return None
        answered = self.cycle is None or self.cycle.response_complete
        if not answered:
            return None  # the app has the request: bodies it reads have their own deadlines
        reading = self._reading()
        if reading == "nothing":
            return "head" if self.cycle is None else "idle"
        return {"head": "head", "body": "drain", None: None}[reading]

    def _track(self) -> None:
        """Arm the deadline of the phase the connection is in (kept from when the phase began), or none."""
        phase = self._phase()
        if phase == self._armed:
            return
        self._disarm()
        if phase is not None:
            delay = {"head": self.rules.header_timeout_s, "idle": self.rules.keep_alive_s, "drain": self.rules.body_timeout_s}[phase]
            self._timer = self.loop.call_later(delay, self._expired, phase)
            self._armed, self._armed_at = phase, self.loop.time()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed = None, None

    def _expired(self, phase: Phase) -> None:
        self._timer, self._armed = None, None
        if self._phase() != phase:
            return
        if phase == "head" and self._reading() == "head":  # half a request is here: say why it ends
            message = f"the request headers did not arrive within {self.rules.header_timeout_s:g} s (--header-timeout-s)"
            self.transport.write(self._answer(408, "header_timeout", message))
        self.transport.close()

    def _refuse_now(self) -> None:
        """The 503 of a connection over the cap, once its first request's headers are in, and the close."""
        open_now, cap = len(self.connections) - 1, self.rules.max_connections
        message = f"the server has {open_now} connections open (--max-connections {cap}); retry shortly"
        self.transport.write(self._answer(503, "too_many_connections", message, retry_after_s=1))
        self.transport.close()

    def _answer(self, status: int, code: str, message: str, retry_after_s: int | None = None) -> bytes:
        """A complete JSON answer with `Connection: close`, written without the parser (no request may be in its state)."""
        body = json.dumps({"error": code, "message": message}).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
            *((("retry-after", str(retry_after_s)),) if retry_after_s is not None else ()),
            *self.rules.headers,
        ]
        head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return (head + "\r\n").encode("latin-1") + body


class GuardedH11Protocol(ConnectionGuard, H11Protocol):
    """One HTTP/1.1 connection parsed by h11 (pure Python), as uvicorn's `H11Protocol`, with the guards."""

    def _reading(self) -> Reading | None:
        if self.conn.their_state is h11.IDLE:
            return "head" if self.conn.trailing_data[0] else "nothing"
        return "body" if self.conn.their_state is h11.SEND_BODY else None

    def _refuse(self, data: bytes) -> None:
        self.conn.receive_data(data)
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            self.transport.close()
            return
        if isinstance(event, h11.Request):
            self._refuse_now()


class GuardedHttpToolsProtocol(ConnectionGuard, HttpToolsProtocol):
    """One HTTP/1.1 connection parsed by httptools (llhttp, in C; several times h11's rate), as uvicorn's
    `HttpToolsProtocol`, with the guards. The parser's callbacks say where the client is."""

    _client_is: Reading = "nothing"

    def _reading(self) -> Reading | None:
        return self._client_is

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._client_is = "head"

    def on_headers_complete(self) -> None:
        self._client_is = "body"
        if self._refusing:  # answered here; the app never sees the request
            self._refuse_now()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._client_is = "nothing"
        if not self._refusing:
            super().on_message_complete()

    def _refuse(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        try:  # the parser calls on_headers_complete, which answers and closes
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.transport.close()


PROTOCOLS: dict[str, type[ConnectionGuard]] = {"httptools": GuardedHttpToolsProtocol, "h11": GuardedH11Protocol}
"""The guarded protocols, by `--http` name."""
