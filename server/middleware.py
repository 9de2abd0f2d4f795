"""ASGI middleware, outermost first: counting inference requests, error containment, and the guard on request bodies."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .budgets import BodyBudget
from .content_encoding import body_decoder
from .errors import BodyBudgetFull, ClientGone, PayloadTooLarge, RequestTimeout, ServeError
from .http_errors import error_response

log = logging.getLogger(__name__)


INFERENCE_ROUTES = (
    (re.compile(r"/v1/tasks/([^/]+)/[^/]+"), "v1"),
    (re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer"), "v2"),
)
"""The inference routes' paths, the task each names, and their protocol's metric label."""


class CountRequests:
    """Counts every inference request with the status it was answered with, those refused before their
    route ran too (a missing token, a body too large, a path that does not validate), once, under the
    task it names (`DataPlane.count_request`). A request whose answer never started counts as 499
    (its client left) or 500."""

    def __init__(self, app: ASGIApp, count: Callable[[str, str, int], None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _inference_route(scope)
        if route is None:
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.count(*route, status)


def _inference_route(scope: Scope) -> tuple[str, str] | None:
    """(task, protocol) of an inference request; None for every other request."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    for pattern, protocol in INFERENCE_ROUTES:
        match = pattern.fullmatch(scope["path"])
        if match is not None:
            return match[1], protocol
    return None


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
    """Limits on request bodies: size by route, and read speed."""

    default_limit: int
    upload_limit: int
    upload_prefix: str
    timeout_s: float
    """The longest wait for the next part of a body, and the window `min_rate` is measured over."""
    min_rate: float
    """Bytes per second a body must average over every `timeout_s` window until it is complete (0: off)."""


class BodyGuard:
    """Refuses bodies over their route's limit (413, by Content-Length or while streaming), bodies
    that do not fit their `BodyBudget` (503 with Retry-After), bodies that arrive too slowly (408),
    and counts a client that leaves mid-body as gone (499). Adapter uploads have a budget of their own,
    so a package upload and inference bodies never crowd each other out. A compressed body (gzip,
    deflate) reaches the app decompressed, within the same limit (`content_encoding.py`).

    The checks that need the body run inside the app's own reads, so their errors are raised where
    the route reads its body and are answered and counted like any other error of that route.
    """

    def __init__(self, app: ASGIApp, rules: BodyRules, budget: BodyBudget, upload_budget: BodyBudget) -> None:
        self.app, self.rules, self.budget, self.upload_budget = app, rules, budget, upload_budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rules = self.rules
        upload = scope["path"].startswith(rules.upload_prefix)
        limit, budget = (rules.upload_limit, self.upload_budget) if upload else (rules.default_limit, self.budget)
        limit_name = "the largest adapter package" if upload else "--max-request-mb"
        too_large = f"request body exceeds {limit} bytes ({limit_name})"
        headers = dict(scope["headers"])
        declared_header = headers.get(b"content-length")
        declared = int(declared_header) if declared_header is not None and declared_header.isdigit() else 0
        if declared > limit:
            return await self._refuse(scope, receive, send, PayloadTooLarge(too_large))
        if not budget.fits(declared):  # say so before the client sends it all
            return await self._refuse(scope, receive, send, self._no_room(budget, declared))
        try:
            decoder = body_decoder(headers.get(b"content-encoding"), limit, limit_name)
        except ServeError as exc:
            return await self._refuse(scope, receive, send, exc)
        if decoder is not None:  # the app reads the body as it was before it was compressed
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]}
        held, received, done = 0, 0, False
        loop = asyncio.get_running_loop()
        started = window_start = loop.time()
        window_bytes, window_need = 0, rules.min_rate * rules.timeout_s

        async def guarded_receive() -> Message:
            nonlocal held, received, done, window_start, window_bytes
            if done:  # the body is in: later reads only wait for the client to leave, with no deadline
                return await receive()
            deadline = loop.time() + rules.timeout_s
            if window_bytes < window_need:  # this window still owes bytes: by its end
                deadline = min(deadline, window_start + rules.timeout_s)
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
            body, done = message.get("body", b""), not message.get("more_body", False)
            received += len(body)
            if received > limit:
                raise PayloadTooLarge(too_large)
            window_bytes += len(body)
            if window_bytes >= window_need:  # this window is paid: the next one starts now
                window_start, window_bytes = loop.time(), 0
            if decoder is not None:
                body = await decoder.feed(body, final=done)
                message = {**message, "body": body}
            if not budget.take(len(body), own=held):  # what is held in memory: the body as the app reads it
                raise self._no_room(budget, held + len(body))
            held += len(body)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            budget.give(held)

    @staticmethod
    def _no_room(budget: BodyBudget, nbytes: int) -> BodyBudgetFull:
        return BodyBudgetFull(
            f"request bodies held at once would exceed {budget.capacity} bytes ({budget.name}) "
            f"with this one ({nbytes} bytes); retry shortly",
            retry_after_s=1,
        )

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: ServeError) -> None:
        response = error_response(scope["path"], error.status, error.code, error.message, error.headers())
        await response(scope, receive, send)
