"""Dynamic batching: one queue per input size, micro-batches that mix tasks, one worker thread per device."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from monaserve.adapters.transforms import stack_images

from .errors import Overloaded
from .metrics import Metrics

log = logging.getLogger(__name__)
RunBatch = Callable[[torch.Tensor, list[int]], list[torch.Tensor]]


@dataclass
class Job:
    """One request's images, all for one slot and one `model` (task, version). `future` gets the outputs in image order.

    `on_settled` runs once every image has left the scheduler (run, or dropped because the request
    gave up), which is when the request's slot may be released.
    """

    images: list[torch.Tensor]
    slot: int
    model: tuple[str, int]
    on_settled: Callable[[], None]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    outputs: list[torch.Tensor | None] = field(init=False)
    pending: int = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.images)
        self.pending = len(self.images)

    @property
    def queue_s(self) -> float:
        return (self.started or self.enqueued) - self.enqueued

    @property
    def inference_s(self) -> float:
        return (self.finished or 0.0) - (self.started or 0.0)

    def settle(self, index: int, output: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self.outputs[index] = output
        self.pending -= 1
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            elif self.pending == 0:
                self.future.set_result(self.outputs)
        if self.pending == 0:
            try:
                self.on_settled()
            except Exception:  # releasing must never take the scheduler down with it
                log.exception("releasing a finished job failed")


@dataclass
class _Item:
    job: Job
    index: int

    @property
    def image(self) -> torch.Tensor:
        return self.job.images[self.index]


class Scheduler:
    """Collects images into batches: a batch closes at `max_batch` images or when its oldest image has
    waited `max_delay_s`; the bucket whose head waited longest goes first. Batches run one at a time in
    `worker` (a single thread per device), while the next batch fills on the event loop."""

    def __init__(
        self,
        run_batch: RunBatch,
        worker: Executor,
        metrics: Metrics,
        max_batch: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 512,
    ) -> None:
        self.run_batch = run_batch
        self.worker = worker
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.queued = 0
        self._buckets: dict[tuple[int, int], deque[_Item]] = {}
        self._wake = asyncio.Event()
        self._closing = False

    def submit(self, job: Job) -> None:
        """Queue a job's images, or raise `Overloaded` if the queue cannot take them all."""
        if self._closing:
            raise Overloaded("the server is shutting down", retry_after_s=1)
        if self.queued + len(job.images) > self.max_queue:
            raise Overloaded(f"queue full ({self.queued} images waiting, limit {self.max_queue})", retry_after_s=1)
        for index, image in enumerate(job.images):
            self._buckets.setdefault(tuple(image.shape[-2:]), deque()).append(_Item(job, index))
        self.queued += len(job.images)
        self.metrics.queue_depth.set(self.queued)
        self._wake.set()

    async def run(self) -> None:
        """Form and run batches until `close()` is called and the queue is empty."""
        while True:
            if self.queued == 0:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            queue = min((q for q in self._buckets.values() if q), key=lambda q: q[0].job.enqueued)
            deadline = queue[0].job.enqueued + self.max_delay_s
            while len(queue) < self.max_batch and not self._closing and (remaining := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(remaining):  # no task per wait, as wait_for would make
                        await self._wake.wait()
                except TimeoutError:
                    break
            items = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
            self.queued -= len(items)
            self.metrics.queue_depth.set(self.queued)
            await self._execute(items)

    def close(self) -> None:
        """Stop taking jobs; `run` returns once what is queued has run."""
        self._closing = True
        self._wake.set()

    async def _execute(self, items: list[_Item]) -> None:
        live = []
        for item in items:
            if item.job.future.done():  # the request timed out, failed or its client left: skip its images
                item.job.settle(item.index)
                self.metrics.dropped_images.inc()
            else:
                live.append(item)
        if not live:
            return
        started = time.monotonic()
        for item in live:
            item.job.started = item.job.started or started
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self.worker, self._forward, live)
        except Exception as exc:
            for item in live:
                item.job.settle(item.index, error=exc)
            return
        finished = time.monotonic()
        self.metrics.batch_size.observe(len(live))
        self.metrics.batch_tasks.observe(len({item.job.slot for item in live}))
        for (task, version), images in Counter(item.job.model for item in live).items():
            self.metrics.observe_model_batch(task, version, images, finished - started)
        for item, output in zip(live, outputs):
            item.job.finished = finished
            item.job.settle(item.index, output)

    def _forward(self, items: list[_Item]) -> list[torch.Tensor]:
        """On the engine thread: the batch's own time is measured here, without executor or loop waits."""
        started = time.perf_counter()
        images = stack_images([item.image for item in items])
        outputs = self.run_batch(images, [item.job.slot for item in items])
        self.metrics.observe_batch(time.perf_counter() - started)
        return outputs
