"""Bounds on what requests may hold and what one answer may carry."""

from __future__ import annotations

from .errors import ResponseTooLarge

MiB = 2**20


class BodyBudget:
    """Bytes of request bodies held in memory at once, all requests together (`--max-body-buffer-mb`).

    Bodies take room as their bytes arrive, so a slow sender holds only what it has sent. A body that
    does not fit waits for nothing: it is refused (503), unless it is the only one held, so one body as
    large as the request limit always gets through. Used on the event loop only.
    """

    def __init__(self, capacity: int, name: str) -> None:
        self.capacity = capacity
        self.name = name  # what the budget is, for error messages: the flag that sets it
        self.held = 0

    def fits(self, nbytes: int, own: int = 0) -> bool:
        """Whether `nbytes` more fit, for a body that already holds `own` of them."""
        return self.held == own or self.held + nbytes <= self.capacity

    def take(self, nbytes: int, own: int = 0) -> bool:
        if not self.fits(nbytes, own):
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
        self.check(nbytes, what)
        self.used += nbytes

    def check_total(self, nbytes: int) -> None:
        """Raise `ResponseTooLarge` if the finished answer, `nbytes` long, is over the limit."""
        if nbytes > self.limit:
            raise ResponseTooLarge(
                f"the answer would be {nbytes} bytes; the limit is {self.limit} (--max-response-mb): send fewer images per request"
            )

    def check(self, nbytes: int, what: str) -> None:
        """Raise `ResponseTooLarge` unless `nbytes` more for `what` would fit (charging nothing)."""
        if self.used + nbytes > self.limit:
            raise ResponseTooLarge(
                f"the answer would be more than {self.limit / MiB:g} MiB (--max-response-mb) once {what} is added: "
                "send fewer images per request, or ask for less (fewer outputs; no RLE; binary tensors)"
            )
