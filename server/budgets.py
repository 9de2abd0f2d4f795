"""Bounds on what requests may hold and what one answer may carry."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from .errors import ResponseTooLarge

MiB = 2**20


class Tally(Protocol):
    """Where a budget counts what is held: this process alone, or every process of the server."""

    def total(self) -> int: ...
    def add(self, nbytes: int) -> None: ...
    def locked(self) -> AbstractContextManager: ...


class LocalTally:
    """The count of one process (the event loop's thread only: no lock)."""

    def __init__(self) -> None:
        self.held = 0

    def total(self) -> int:
        return self.held

    def add(self, nbytes: int) -> None:
        self.held += nbytes

    def locked(self) -> AbstractContextManager:
        return contextlib.nullcontext()


class SharedTally:
    """The count of every front-end process under `--workers`: one int64 slot per process in a file all of
    them map, summed and changed under an exclusive `flock`. Each process writes only its own slot, which it
    zeroes as it starts, so a process that died holding bytes does not hold them for ever."""

    def __init__(self, path: Path, offset: int, slots: int, own: int) -> None:
        self._file = open(path, "r+b")  # held open, and mapped, for the process's life
        self._map = mmap.mmap(self._file.fileno(), 0)
        self._slots = memoryview(self._map)[offset : offset + 8 * slots].cast("q")
        self._own = own
        with self.locked():
            self._slots[own] = 0

    def total(self) -> int:
        return sum(self._slots)

    def add(self, nbytes: int) -> None:
        self._slots[self._own] += nbytes

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)


class BodyBudget:
    """Bytes of request bodies held in memory at once, all requests together (`--max-body-buffer-mb`;
    under `--workers`, of all front-end processes together, with a `SharedTally`).

    Bodies take room as their bytes arrive, so a slow sender holds only what it has sent. A body that
    does not fit waits for nothing: it is refused (503), unless it is the only one held, so one body as
    large as the request limit always gets through. Used on the event loop only.
    """

    def __init__(self, capacity: int, name: str, tally: Tally | None = None) -> None:
        self.capacity = capacity
        self.name = name  # what the budget is, for error messages: the flag that sets it
        self.tally = tally or LocalTally()

    @property
    def held(self) -> int:
        return self.tally.total()

    def fits(self, nbytes: int, own: int = 0) -> bool:
        """Whether `nbytes` more fit, for a body that already holds `own` of them."""
        held = self.tally.total()
        return held == own or held + nbytes <= self.capacity

    def take(self, nbytes: int, own: int = 0) -> bool:
        with self.tally.locked():
            if not self.fits(nbytes, own):
                return False
            self.tally.add(nbytes)
        return True

    def give(self, nbytes: int) -> None:
        with self.tally.locked():
            self.tally.add(-nbytes)


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
