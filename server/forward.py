"""Admin calls in a front-end process, passed on to the engine process's own HTTP server over its private
Unix socket and answered as it answered there: adapter slots, uploads and loads live in that process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import bearer_credentials, check_admin
from .config import REPLICA_HEADER, ServeConfig
from .errors import ClientGone, ServeError
from .http_errors import serve_error_response
from .remote_engine import engine_gone

FORWARD_TIMEOUT_S = 300.0
"""The longest an admin call may take in the engine process (an upload validates, loads and stores a package)."""
NOT_FORWARDED = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"})
URL_SAFE = "/%:@!$&'()*+,;=-._~"
"""What passes unescaped into the forwarded URL: the characters of a URL path and query, and `%` (what
the client escaped stays escaped, so the engine process decodes the path exactly as this one did)."""
NOT_RETURNED = NOT_FORWARDED | {"date", "server", REPLICA_HEADER.lower()}  # this process's server adds its own


def engine_http_client(socket_path: str) -> httpx.AsyncClient:
    """A client of the engine process's private HTTP server."""
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket_path), base_url="http://engine", timeout=FORWARD_TIMEOUT_S)


class ForwardToEngine:
    """ASGI middleware (inside the body guard, so a forwarded body has met this process's limits first):
    a request for one of the admin `routes` goes to the engine process once its token has been checked
    here (a caller without one is answered before its body is read); everything else, a wrong method or
    a path no route has included, goes to the app, which answers as one process would."""

    def __init__(self, app: ASGIApp, socket_path: str, routes: list[APIRoute], config: ServeConfig) -> None:
        self.app = app
        self.routes = routes
        self.prefixes = tuple({route.path.split("{")[0] for route in routes})  # a cheap test first: most requests are not admin calls
        self.config = config
        self.client = engine_http_client(socket_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._is_admin_call(scope):
            return await self.app(scope, receive, send)
        try:
            response = await self._forward(scope, receive)
        except ServeError as exc:  # the token's refusal, and the body guard's, raised as the body was read
            response = serve_error_response(scope["method"], scope["path"], exc)
        await response(scope, receive, send)

    def _is_admin_call(self, scope: Scope) -> bool:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            return False
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes)

    async def _forward(self, scope: Scope, receive: Receive) -> Response:
        authorization = dict(scope["headers"]).get(b"authorization")
        check_admin(self.config, bearer_credentials(authorization.decode("latin-1") if authorization else None))  # before the body
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1") not in NOT_FORWARDED]
        try:
            answer = await self.client.request(scope["method"], forwarded_url(scope), headers=headers, content=await body_of(receive))
        except httpx.HTTPError as exc:
            raise engine_gone(type(exc).__name__) from None
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in NOT_RETURNED}
        return Response(answer.content, status_code=answer.status_code, headers=kept)


async def body_of(receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The request's body: its bytes when they came in one message (most admin calls), else a stream of
    them, so a package upload is passed on as it arrives instead of being held whole here."""
    first = await next_chunk(receive)
    if not first[1]:
        return first[0]

    async def rest() -> AsyncIterator[bytes]:
        chunk, more = first
        yield chunk
        while more:
            chunk, more = await next_chunk(receive)
            yield chunk

    return rest()


async def next_chunk(receive: Receive) -> tuple[bytes, bool]:
    """The next part of the body and whether more follows; a client that left is `ClientGone`."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone("the client left before its admin call was sent on")
    return message.get("body", b""), message.get("more_body", False)


def forwarded_url(scope: Scope) -> str:
    """The path and query as the client sent them, with what a URL cannot hold escaped, and segments of
    only dots escaped too (the engine process then resolves exactly the route this process matched)."""
    path = quote(scope.get("raw_path") or scope["path"].encode(), safe=URL_SAFE)
    path = "/".join("%2E" * len(segment) if segment and set(segment) == {"."} else segment for segment in path.split("/"))
    query = scope["query_string"]
    return path + ("?" + quote(query, safe=URL_SAFE + "?") if query else "")
