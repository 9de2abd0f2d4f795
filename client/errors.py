"""What the client raises: the server's own error code and message, or why it could not be reached."""

from __future__ import annotations


class MonaError(Exception):
    """Base of every client error."""


class MonaServerError(MonaError):
    """The server answered with an error: HTTP `status`, its machine-readable `code` and its `message`."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


class MonaConnectionError(MonaError):
    """The server could not be reached (or stopped answering) after every retry."""
