"""Bounds on what requests may hold and what one answer may carry."""

from __future__ import annotations

from .errors import ResponseTooLarge

MiB = 2**20


class BodyBudget:
    """Bytes of request bodies held in memory at once, all requests together (`--max-body-buffer-mb`).

    A body that does not fit waits for nothing: it is refused (503), unless no other body is held, so
    one body as large as the request limit always gets through. Used on the event loop only.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0

    def take(self, nbytes: int) -> bool:
        if nbytes and self.held and self.held + nbytes > self.capacity:
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes


class ResponseBudget:
    """Bytes one answer may carry (`--max-response-mb`), charged while it is built, so an answer that
    would be too large stops before it is made rather than after."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count `nbytes` more for `what`; raise `ResponseTooLarge` past the limit."""
        self.used += nbytes
        if self.used > self.limit:
            raise ResponseTooLarge(
                f"the answer would be more than {self.limit / MiB:g} MiB (--max-response-mb) once {what} is added: "
                "send fewer images per request, or ask for less (fewer outputs; no RLE; binary tensors)"
            )
