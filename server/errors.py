"""Errors the serving side raises on purpose; each carries the HTTP status and a stable code."""

from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be served; `status` and `code` go into the JSON error body."""

    status = 500
    code = "internal"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


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


class WrongKind(ServeError):
    status, code = 409, "wrong_kind"


class VersionExists(ServeError):
    status, code = 409, "version_exists"


class PayloadTooLarge(ServeError):
    status, code = 413, "too_large"


class UnsupportedMedia(ServeError):
    status, code = 415, "unsupported_media_type"


class Overloaded(ServeError):
    status, code = 503, "overloaded"


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
