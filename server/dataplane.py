"""The data plane: what every request does, whatever protocol carried it.

An inference request is resolved (task, version, kind), its images decoded and prepared, run on the
engine (`EngineClient`: this process's or another's), and each image post-processed by its kind into a
typed result that answers in the original image's pixels. Limits and metrics are applied here, once;
`/v1` and `/v2` (`rest_v1.py`, `oip.py`) only translate their protocol to an `InferRequest` and the
typed results back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from monaserve.adapters.kinds import Options, TaskKind, get_kind
from monaserve.adapters.swin import resolve_device
from monaserve.adapters.transforms import Prepared

from .budgets import ResponseBudget
from .catalog import TaskEntry, TaskLookup, TaskVersion
from .engine_client import EngineRun
from .errors import PayloadTooLarge, Timeout, WrongKind
from .oip_models import model_config
from .registry import Registry

if TYPE_CHECKING:
    from .runtime import AnyRuntime

T = TypeVar("T")
MiB = 2**20
INLINE_RESULT_ENTRIES = 64
"""Results this small (labels, boxes) are post-processed and rendered on the event loop: well under a
millisecond, less than the trip to a pool thread and back."""


@dataclass(frozen=True)
class InferRequest:
    """One inference request as every protocol reads it."""

    task: str
    images: list[bytes | np.ndarray]  # encoded files, or `(H, W, 3)` uint8 pixels
    version: int | None = None  # pinned; None follows the version the task serves
    kind: str | None = None  # the kind the caller addressed (a /v1 URL); None accepts the task's own
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class Asked:
    """What a request asks, read once its task's kind is known: the options of its results, and a deadline
    shorter than the server's (seconds; None: the server's)."""

    options: Options
    timeout_s: float | None = None


@dataclass(frozen=True)
class InferResult:
    """One request's typed results, all from one adapter version, and the budget its answer is rendered within."""

    task: str
    kind: TaskKind
    version: int
    results: list[Any]
    options: Options
    timings_s: dict[str, float]
    budget: ResponseBudget
    started: float = 0.0
    """When the data plane took the request (`time.monotonic()`): a renderer takes the total as it finishes."""

    def total_s(self) -> float:
        """Seconds since the request was taken: decoding, the engine, post-processing and the answer so far."""
        return time.monotonic() - self.started


def check_image_count(count: int, limit: int) -> None:
    """The one limit on images per request, for every protocol: 413 past it."""
    if count > limit:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {limit} (--max-images-per-request)")


class DataPlane:
    """Inference, metadata and readiness over the runtime's registry, decoder and engine."""

    def __init__(self, runtime: AnyRuntime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.metrics = runtime.metrics

    # ---- server ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    @property
    def registry(self) -> Registry:
        """The registry, once start-up has made it (503 with Retry-After before); the engine process's only."""
        self.runtime.require_ready()
        return self.runtime.registry

    @property
    def catalog(self) -> TaskLookup:
        """The tasks this process knows, once start-up has read them (503 with Retry-After before)."""
        self.runtime.require_ready()
        return self.runtime.catalog

    # ---- tasks -----------------------------------------------------------------------------

    async def task(self, name: str, version: int | None = None) -> TaskVersion:
        """`name` at `version` (default: the version it serves); 404 for an unknown task or version."""
        return await self.catalog.version(name, version)

    async def servable(self, name: str, version: int | None = None) -> TaskVersion:
        """What a request for `name` (at `version`, or not) would run; 404 while it is unloaded, as inference is."""
        return await self.catalog.serving(name, version)

    async def model_ready(self, name: str, version: int | None = None) -> bool:
        """Whether `name` (at `version`) serves now: what the repository index says, every stored version of
        a loaded task READY; 404 for an unknown task or version."""
        target = await self.task(name, version)
        return self.ready and target.entry.enabled

    async def model_config(self, name: str, version: int | None = None) -> dict:
        """The model configuration extension's answer for `name` (`oip_models.model_config`); 404 while unloaded."""
        on_gpu = resolve_device(self.config.device).type == "cuda"
        return model_config(await self.servable(name, version), self.config, on_gpu)

    async def stats_models(self, name: str | None, version: int | None) -> list[tuple[str, int]]:
        """The (task, version)s statistics are reported for: one version, every version of one task, or
        (no name) every READY version; 404 for a task that is unknown or unloaded."""
        if name is None:
            return [(entry.name, v) for entry in self.tasks() if entry.enabled for v in sorted(entry.versions)]
        target = await self.servable(name, version)
        return [(name, target.version)] if version is not None else [(name, v) for v in sorted(target.entry.versions)]

    def tasks(self) -> list[TaskEntry]:
        """Every task in the catalog, by name (kept fresh by the catalog refresh; no store read per call)."""
        catalog = self.catalog
        return [catalog[name] for name in sorted(catalog)]

    # ---- inference -------------------------------------------------------------------------

    def count_request(self, task: str, protocol: str, status: int) -> None:
        """Count one inference request for `task` under its kind, the protocol that carried it and the
        status it ended with (a task the catalog does not know is not counted: names a client makes up
        must not grow the metrics)."""
        catalog = self.runtime.catalog
        entry = catalog.get(task) if catalog is not None else None
        if entry is not None:
            self.metrics.requests.labels(task, entry.manifest.kind, protocol, str(status)).inc()

    async def infer(
        self, request: InferRequest, render: Callable[[InferResult], T], read_asked: Callable[[TaskKind], Asked] | None = None
    ) -> T:
        """Run `request` within the request timeout, then post-process and `render` its results (the
        protocol's answer) off the event loop. `read_asked`, for a protocol that can read what is asked
        only once it knows the task's kind, gives the options (in place of `request.options`) and a
        shorter deadline before any work runs."""
        check_image_count(len(request.images), self.config.max_images_per_request)
        timeout = self.config.request_timeout_s
        started = time.monotonic()
        target: TaskVersion | None = None
        try:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    target = await self._resolve(request)
                    asked = Asked(request.options) if read_asked is None else read_asked(target.kind)
                    if asked.timeout_s is not None and asked.timeout_s < timeout:  # the client's deadline, from the same start
                        deadline.reschedule(deadline.when() - (timeout - asked.timeout_s))
                        timeout = asked.timeout_s
                    prepared = await self.runtime.decoder.prepare(request.images, target.manifest.input)
                    decoded = time.monotonic()
                    run = await self.runtime.engine_client.run(
                        request.task, target.version, target.manifest, [p.tensor for p in prepared], request.version is not None
                    )
            except TimeoutError:
                raise Timeout(f"request for {request.task!r} did not finish within {timeout:g} s") from None
            ran = time.monotonic()
            timings = {"decode": decoded - started, "queue": run.queue_s, "inference": run.inference_s, "total": ran - started}
            for stage, seconds in timings.items():
                self.metrics.latency.labels(request.task, stage).observe(seconds)
            self.metrics.images.labels(request.task).inc(len(request.images))
            answer = await self._answer(request, run, prepared, asked.options, timings, render, started)
        except BaseException:
            if target is not None:  # it reached a version: the statistics extension counts it as failed there
                self.metrics.observe_model_failure(request.task, target.version, time.monotonic() - started)
            raise
        finished = time.monotonic()
        stages = {
            "queue": run.queue_s,
            "compute_input": decoded - started,
            "compute_infer": run.inference_s,
            "compute_output": finished - ran,
        }
        self.metrics.observe_model_success(request.task, run.version, len(request.images), stages, finished - started)
        return answer

    async def _answer(
        self,
        request: InferRequest,
        run: EngineRun,
        prepared: list[Prepared],
        options: Options,
        timings: dict,
        render: Callable[[InferResult], T],
        started: float,
    ) -> T:
        """Post-process `run`'s predictions with `options` (what they leave out, the version's defaults) and
        `render` the protocol's answer: on the event loop when cheap."""
        kind = get_kind(run.manifest.kind)
        options = options.with_defaults(kind.defaults(run.manifest.head))
        budget = ResponseBudget(int(self.config.max_response_mb * MiB))

        def finish() -> T:  # mask resizing, encoding and JSON are CPU work: off the loop unless cheap
            results = [kind.postprocess(p, run.manifest.labels, q, options) for p, q in zip(run.predictions, prepared)]
            return render(InferResult(request.task, kind, run.version, results, options, timings, budget, started))

        entries = kind.result_entries(run.predictions, options)
        if entries is not None and entries <= INLINE_RESULT_ENTRIES:
            return finish()
        return await asyncio.get_running_loop().run_in_executor(self.runtime.decode_pool, finish)

    async def _resolve(self, request: InferRequest) -> TaskVersion:
        """The version `request` gets: 404 if unknown, unloaded (pinned too) or the wrong kind."""
        target = await self.catalog.serving(request.task, request.version)
        if request.kind is not None and target.manifest.kind != request.kind:
            kind = target.manifest.kind
            raise WrongKind(f"task {request.task!r} is a {kind} task; use /v1/tasks/{request.task}/{kind}")
        return target
