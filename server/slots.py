"""Device slots: which task version sits in which slot, who holds it, and which idle one makes room.

A request holds a `Lease` on its slot until its batch has run. A slot whose weights are gone while
requests still hold it (a purge, a version replaced in the store) is *retired*: out of `residents` at
once (no new request finds it) and freed when its last lease ends; an unloaded task's busy slots are
freed when their leases end. Which idle resident gives way to a new one is the `EvictionPolicy`'s choice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from monaserve.adapters import AdapterPackage, Manifest

from .engine import Engine
from .errors import AdapterTooLarge, Overloaded
from .metrics import Metrics

log = logging.getLogger(__name__)
Key = tuple[str, int]


@dataclass(eq=False)
class Resident:
    """A task version installed in a device slot; `refs` counts the leases on it."""

    key: Key
    slot: int
    nbytes: int
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    evict_when_idle: bool = False


@dataclass(frozen=True)
class Lease:
    """A request's hold on a slot: the slot stays put until the lease is released."""

    version: int
    manifest: Manifest
    resident: Resident

    @property
    def slot(self) -> int:
        return self.resident.slot


class EvictionPolicy(Protocol):
    def choose(self, idle: list[Resident]) -> Resident:
        """The idle resident to evict (`idle` is never empty)."""
        ...


class LeastRecentlyUsed:
    """Evict the idle resident whose last lease ended longest ago."""

    def choose(self, idle: list[Resident]) -> Resident:
        return min(idle, key=lambda resident: resident.last_used)


class SlotPool:
    """The engine's slots, and the device bytes of what is in them (`budget_bytes`: None means slots only)."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        metrics: Metrics,
        budget_bytes: int | None = None,
        admission_timeout_s: float = 30.0,
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.executor = executor
        self.metrics = metrics
        self.budget_bytes = budget_bytes
        self.admission_timeout_s = admission_timeout_s
        self.policy = policy or LeastRecentlyUsed()
        self.residents: dict[Key, Resident] = {}
        self.free = list(range(engine.num_slots))
        self._reserved_bytes = 0
        self._retiring: set[Resident] = set()
        self._slot_freed = asyncio.Event()
        metrics.slots_total.set(engine.num_slots)
        metrics.budget_bytes.set(budget_bytes or 0)

    def nbytes(self, package: AdapterPackage) -> int:
        """Device bytes `package` takes in a slot: the folded adapters and its head."""
        head_values = sum(t.numel() for name, t in package.tensors.items() if name.startswith("head."))
        return self.engine.slot_nbytes + head_values * self.engine.dtype.itemsize

    def resident_bytes(self) -> int:
        """Bytes of adapters in slots, including ones being installed and retired ones still in use."""
        in_use = sum(r.nbytes for r in self.residents.values()) + sum(r.nbytes for r in self._retiring)
        return in_use + self._reserved_bytes

    def lease(self, key: Key, manifest: Manifest) -> Lease | None:
        """A lease on `key`'s slot, or None if it holds none (evicted meanwhile: load it again)."""
        resident = self.residents.get(key)
        if resident is None:
            return None
        resident.refs += 1
        resident.last_used = time.monotonic()
        return Lease(key[1], manifest, resident)

    def release(self, lease: Lease) -> None:
        resident = lease.resident
        resident.refs -= 1
        resident.last_used = time.monotonic()
        if resident.refs == 0:
            if resident.evict_when_idle:
                self.evict(resident)
            self._slot_freed.set()

    async def install(self, key: Key, package: AdapterPackage) -> Resident:
        """Put `package` in a slot, making room first; the install itself runs in `executor`."""
        nbytes = self.nbytes(package)
        slot = await self._admit(key, nbytes)
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.install, slot, package)
        except BaseException:
            self.free.append(slot)
            self._slot_freed.set()
            raise
        finally:
            self._reserved_bytes -= nbytes
        resident = self.residents[key] = Resident(key, slot, nbytes)
        self._update_gauges()
        self._slot_freed.set()  # an idle resident appeared: a waiting admission may evict it
        return resident

    def _fits(self, nbytes: int) -> bool:
        budget_ok = self.budget_bytes is None or self.resident_bytes() + nbytes <= self.budget_bytes
        return bool(self.free) and budget_ok

    async def _admit(self, key: Key, nbytes: int) -> int:
        """Take a free slot with room in the byte budget, evicting idle residents as the policy picks.
        The bytes stay reserved until the caller's install ends."""
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise AdapterTooLarge(
                f"{key[0]!r} v{key[1]} needs {nbytes / 2**20:.1f} MiB on the device; "
                f"the adapter budget is {self.budget_bytes / 2**20:.1f} MiB"
            )
        deadline = time.monotonic() + self.admission_timeout_s
        while not self._fits(nbytes):
            idle = [r for r in self.residents.values() if r.refs == 0]
            if idle:
                self.evict(self.policy.choose(idle))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(
                    f"no room on the device for {key[0]!r}: all {self.engine.num_slots} slots (or the adapter "
                    "budget) are held by in-flight requests",
                    retry_after_s=1,
                )
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), remaining)
            except TimeoutError:
                pass
        self._reserved_bytes += nbytes
        return self.free.pop(0)

    def evict(self, resident: Resident) -> None:
        """Empty `resident`'s slot now."""
        if self.residents.get(resident.key) is resident:
            del self.residents[resident.key]
        self._retiring.discard(resident)
        self.engine.evict(resident.slot)
        self.free.append(resident.slot)
        self.metrics.adapter_evictions.labels(resident.key[0]).inc()
        self._update_gauges()
        self._slot_freed.set()
        log.info("evicted %s v%s from slot %s", *resident.key, resident.slot)

    def retire(self, resident: Resident) -> None:
        """Make `resident` unreachable for new requests now, and free its slot once idle."""
        if resident.refs == 0:
            self.evict(resident)
            return
        if self.residents.get(resident.key) is resident:
            del self.residents[resident.key]
        resident.evict_when_idle = True
        self._retiring.add(resident)

    def release_task(self, task: str, retire: bool) -> None:
        """Free `task`'s slots: idle ones now, busy ones when their leases end; `retire` also hides the
        busy ones from new requests at once (their weights are gone)."""
        for resident in [r for r in self.residents.values() if r.key[0] == task]:
            if retire:
                self.retire(resident)
            elif resident.refs == 0:
                self.evict(resident)
            else:
                resident.evict_when_idle = True

    def keep(self, key: Key) -> None:
        """`key` serves again: it stays in its slot when idle."""
        if key in self.residents:
            self.residents[key].evict_when_idle = False

    def _update_gauges(self) -> None:
        self.metrics.slots_used.set(self.engine.num_slots - len(self.free))
        self.metrics.resident_bytes.set(self.resident_bytes())
