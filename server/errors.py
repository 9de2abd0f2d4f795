"""Errors the serving side raises on purpose; each carries the HTTP status and a stable code."""

from __future__ import annotations

import asyncio


class ServeError(Exception):
    """A request that cannot be served; `status` and `code` go into the JSON error body."""

    status = 500
    code = "internal"
    close_connection = False
    """Answer with `Connection: close`: the client is too slow for the rest of its body to be read and thrown away."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def answered(cls, status: int, code: str, message: str) -> ServeError:
        """The error another process of this server answered with, raised here with its status and code."""
        error = cls(message)
        error.status, error.code = status, code
        return error

    def headers(self) -> dict[str, str]:
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return headers | ({"Connection": "close"} if self.close_connection else {})


class BadRequest(ServeError):
    status, code = 400, "bad_request"


class Unauthorized(ServeError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServeError):
    status, code = 403, "forbidden"


class UnknownTask(ServeError):
    status, code = 404, "unknown_task"


class UnknownVersion(ServeError):
    status, code = 404, "unknown_version"


class TaskUnloaded(ServeError):
    status, code = 404, "task_unloaded"


class RequestTimeout(ServeError):
    """The request's body arrived too slowly (--body-timeout-s, --body-min-rate)."""

    status, code, close_connection = 408, "body_timeout", True


class WrongKind(ServeError):
    status, code = 409, "wrong_kind"


class VersionExists(ServeError):
    status, code = 409, "version_exists"


class ConcurrentChange(ServeError):
    """Another admin call changed the task while this one ran (a purge during an upload, say); nothing was changed."""

    status, code = 409, "concurrent_change"


class PayloadTooLarge(ServeError):
    status, code = 413, "too_large"


class ResponseTooLarge(ServeError):
    """The answer would exceed --max-response-mb (or another bound on what one response may carry)."""

    status, code = 400, "response_too_large"


class UnsupportedMedia(ServeError):
    status, code = 415, "unsupported_media_type"


class ClientGone(ServeError):
    """The client closed the connection before its answer (nginx's 499); nothing can be sent, the work is dropped."""

    status, code = 499, "client_closed_request"


class Overloaded(ServeError):
    status, code = 503, "overloaded"


class EngineUnavailable(ServeError):
    """The engine process (under `--workers`) stopped answering: a bad gateway, which a load balancer retries elsewhere."""

    status, code = 502, "engine_unavailable"


class BodyBudgetFull(Overloaded):
    """Request bodies held in memory at once would exceed --max-body-buffer-mb; the rest of the body is
    read and thrown away (within --body-timeout-s), so the connection stays usable."""


class StoreUnavailable(ServeError):
    """The adapter store could not be read or written (read-only, no permission, unreachable)."""

    status, code = 503, "store_unavailable"


class NotReady(ServeError):
    status, code = 503, "not_ready"


class Timeout(ServeError):
    status, code = 504, "timeout"


class AdapterTooLarge(ServeError):
    status, code = 507, "adapter_too_large"


class StoreFull(ServeError):
    status, code = 507, "store_full"


def status_of(exc: BaseException) -> int:
    """The HTTP status a failed request is counted under: its own, 499 if the client left, else 500."""
    if isinstance(exc, ServeError):
        return exc.status
    return 499 if isinstance(exc, asyncio.CancelledError) else 500
