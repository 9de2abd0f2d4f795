"""Dropping the work of a client that has gone: a request whose connection closes is cancelled where it waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from .errors import ClientGone

T = TypeVar("T")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client closes its connection first, cancel it and raise `ClientGone`.

    Call once the request's body has been read: from then on the server's next ASGI message is the
    disconnect. Cancelling cancels what `work` waits on: decodes not yet started, and a job in the
    scheduler, whose images are then skipped before they reach the engine.
    """
    job = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({job, left}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.cancel()
        left.cancel()
        raise
    if job in done:
        left.cancel()
        return job.result()
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await job  # let it unwind: its slot lease is released as its job settles
    left.result()  # the watch itself failing is a server error, not a client leaving
    raise ClientGone(f"the client left before its answer; its work on {request.url.path} was dropped")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
