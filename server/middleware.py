"""ASGI middleware, outermost first: the replica header, error containment, and the guard on request bodies."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .budgets import BodyBudget
from .errors import BodyBudgetFull, ClientGone, PayloadTooLarge, RequestTimeout, ServeError
from .http_errors import error_response

log = logging.getLogger(__name__)
REPLICA_HEADER = "X-Monaserve-Replica"


class ReplicaHeader:
    """Every HTTP response names the replica that made it (`X-Monaserve-Replica`)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_tagged)


class ContainErrors:
    """An exception that escapes a request is logged and answered with a 500 JSON body, and the
    connection stays usable for the next request.

    (Starlette's own last-resort handler answers and then re-raises, and uvicorn then drops the
    connection without `Connection: close`: a load balancer sees a reset and marks the replica failed.)
    Only an exception after the response has started, which cannot be answered any more, still ends
    the connection: uvicorn closes it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = complete = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started and not complete:
                raise  # half an answer is out: only closing the connection ends it
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                response = error_response(scope["path"], 500, "internal", f"internal error: {type(exc).__name__}")
                await response(scope, receive, send)


@dataclass(frozen=True)
class BodyRules:
    """Limits on request bodies: size by route, the bytes all bodies may hold at once, and read speed."""

    default_limit: int
    upload_limit: int
    upload_prefix: str
    timeout_s: float
    """The longest wait for the next part of a body, and the grace before `min_rate` applies."""
    min_rate: float
    """Bytes per second a body must average once `timeout_s` has passed since it started (0: off)."""


class BodyGuard:
    """Refuses bodies over their route's limit (413, by Content-Length or while streaming), bodies
    that do not fit the shared `BodyBudget` (503 with Retry-After), bodies that arrive too slowly
    (408), and counts a client that leaves mid-body as gone (499).

    The checks that need the body run inside the app's own reads, so their errors are raised where
    the route reads its body and are answered and counted like any other error of that route.
    """

    def __init__(self, app: ASGIApp, rules: BodyRules, budget: BodyBudget) -> None:
        self.app, self.rules, self.budget = app, rules, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rules = self.rules
        limit = rules.upload_limit if scope["path"].startswith(rules.upload_prefix) else rules.default_limit
        declared_header = dict(scope["headers"]).get(b"content-length")
        declared = int(declared_header) if declared_header is not None and declared_header.isdigit() else 0
        if declared > limit:
            return await self._refuse(scope, receive, send, PayloadTooLarge(f"request body exceeds {limit} bytes"))
        if not self.budget.take(declared):
            return await self._refuse(scope, receive, send, self._no_room(declared))
        held, received, done = declared, 0, False
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def guarded_receive() -> Message:
            nonlocal held, received, done
            if done:  # the body is in: later reads only wait for the client to leave, with no deadline
                return await receive()
            deadline = loop.time() + rules.timeout_s
            if rules.min_rate > 0:
                deadline = min(deadline, started + max(rules.timeout_s, received / rules.min_rate))
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body arrived too slowly: {received} of {declared or 'unknown'} bytes in "
                    f"{loop.time() - started:.1f} s (--body-timeout-s {rules.timeout_s:g}, --body-min-rate {rules.min_rate:g} bytes/s)"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone(f"the client left after sending {received} bytes of its request body")
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            if received > held:  # a body without Content-Length takes its room as it arrives
                if not self.budget.take(received - held):
                    raise self._no_room(received)
                held = received
            done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            self.budget.give(held)

    def _no_room(self, nbytes: int) -> BodyBudgetFull:
        return BodyBudgetFull(
            f"request bodies held at once would exceed {self.budget.capacity} bytes (--max-body-buffer-mb) "
            f"with this one ({nbytes} bytes); retry shortly",
            retry_after_s=1,
        )

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: ServeError) -> None:
        response = error_response(scope["path"], error.status, error.code, error.message, error.headers())
        await response(scope, receive, send)
