"""What a kind of task is, as one object: its head, training data, metric, post-process and answers.

Each kind (classify, detect, segment) is a `TaskKind` subclass in a module of its own, registered by
name with `@register_kind` (timm registers models the same way). Code that differs by kind asks the
kind instead of testing its name, so a fourth kind is one new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel
from torch import nn

from ..data.datasets import Sample, TaskData
from ..data.formats import read_training_data
from ..strict import Strict
from ..transforms import InputSpec, Prepared

MAX_LABELS = 100_000
Result = TypeVar("Result")


@dataclass(frozen=True)
class Options:
    """What a request asks of its results, whatever the protocol: labels per image (classify); the lowest
    box score, the most boxes, and one box per object whatever its label (detect); per-class RLE
    (segment). Each kind reads the ones in its `options`. None is "the task's default" (`TaskKind.defaults`,
    from its manifest), filled in by `with_defaults` before post-processing."""

    top_k: int = 5
    min_score: float | None = None
    max_detections: int | None = None
    class_agnostic: bool | None = None
    rle: bool = False
    overlap: float | None = None
    """detect, with `class_agnostic`: the IoU over which the lower-scoring of two boxes goes (the task's NMS IoU; not asked)."""

    def with_defaults(self, defaults: Options) -> Options:
        """These options, each one left as None taking its value from `defaults`."""
        return replace(self, **{f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None})


@dataclass(frozen=True)
class Recipe:
    """How the official Mona configs train a kind, where they differ by kind (github Leiyi-Hu/mona `mona_configs`):
    the backbone's stochastic depth, AdamW's weight decay, and whether biases decay too (norm layers never do)."""

    drop_path: float
    weight_decay: float
    decay_biases: bool


TOP_K_RANGE = (1, 1000)
MIN_SCORE_RANGE = (0.0, 1.0)
MAX_DETECTIONS_RANGE = (1, 1000)
"""The values `Options.top_k`, `Options.min_score` and `Options.max_detections` may take, for every protocol."""


class Budget(Protocol):
    """Bytes an answer may still take; `charge` raises once it would be exceeded."""

    def charge(self, nbytes: int, what: str) -> None: ...


class Metric(Protocol):
    """A held-out evaluation, fed batch by batch: the heads' predictions, targets as `data.datasets.collate` stacks them."""

    def update(self, predictions: list[Any], targets: Any) -> None: ...

    def compute(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class OutputSpec:
    """One tensor of an Open Inference Protocol answer: name, datatype, shape (-1 where it varies)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OutputTensor:
    """One output of a batch of results; `values` builds them, so a shape can be checked before anything is built."""

    datatype: str
    shape: list[int]
    values: Callable[[], Any]


Tensors = dict[str, tuple[list[int], Callable[[], Any]]]
"""A kind's outputs for a batch: name -> (shape, a function that builds the values)."""


class ResultShapeError(ValueError):
    """The results cannot take the asked-for form (a client's mistake, e.g. masks of different sizes in one tensor)."""


class TaskKind(ABC, Generic[Result]):
    """Everything that differs between kinds of task. Heads' `predict` all stop at the same stage: the
    answer in the model input's pixels (probabilities, boxes after NMS, class ids); `postprocess` turns
    it into a result in the original image's pixels."""

    name: ClassVar[str]
    head_config: ClassVar[type[Strict]]
    """The head's configuration in a manifest; its `type` field names the head, its defaults are the kind's."""
    result_schema: ClassVar[type[BaseModel]]
    """One image's result as the /v1 API answers it."""
    outputs: ClassVar[tuple[OutputSpec, ...]]
    """The tensors an Open Inference Protocol answer holds, in order."""
    options: ClassVar[tuple[str, ...]]
    """The `Options` fields a request of this kind may set (the rest do not concern it)."""
    max_labels: ClassVar[int] = MAX_LABELS
    recipe: ClassVar[Recipe]
    """The official configs' training settings for this kind, which `monaserve train` uses unless told otherwise."""

    # ---- the model --------------------------------------------------------------------------

    def default_head(self, channels: int) -> Strict:
        """The head config `monaserve train` writes (`channels`: the width of dense heads)."""
        return self.head_config()

    @abstractmethod
    def build_head(self, config: Strict, stage_dims: list[int], num_classes: int) -> nn.Module:
        """The head `config` describes, over backbone stages of widths `stage_dims`."""

    # ---- training data and evaluation -------------------------------------------------------

    def read_data(self, data: Path, masks: Path | None = None, images: Path | None = None, data_format: str = "auto") -> TaskData:
        """A dataset of this kind in `data_format`, one of the kind's in `data/formats.py` (`auto`: the one that
        recognises `data`); `masks` and `images` where the format needs them."""
        return read_training_data(self.name, data, data_format, masks, images)

    @abstractmethod
    def target(self, sample: Sample, prepared: Prepared, flip: bool, spec: InputSpec) -> Any:
        """`sample`'s target in the model input's pixels, mirrored left-right when its image was (`flip`)."""

    @abstractmethod
    def metric(self, num_classes: int) -> Metric:
        """A fresh accumulator of this kind's evaluation."""

    def tune_head(self, head: Strict, evaluation: dict[str, float]) -> Strict:
        """`head` with what the trainer picks on validation data (`evaluation`, the metric's answer) written in."""
        return head

    # ---- serving ----------------------------------------------------------------------------

    def defaults(self, head: Strict) -> Options:
        """The options a request of a task with `head` gets where it leaves them out."""
        return Options()

    def described_defaults(self, head: Strict) -> dict[str, Any]:
        """The defaults of the options a request may set, by name: what a task's description shows callers."""
        defaults = self.defaults(head)
        return {name: getattr(defaults, name) for name in self.options}

    def result_entries(self, predictions: list, options: Options) -> int | None:
        """How many entries (labels, boxes) the results of `predictions` will hold, which is what post-processing
        and rendering them cost; None where the work is image-sized (masks). The server post-processes small
        results on its event loop (cheaper than the trip to a pool thread and back), the rest in the pool."""
        return None

    @abstractmethod
    def postprocess(self, prediction: Any, labels: list[str], prepared: Prepared, options: Options) -> Result:
        """One image's head prediction as its typed result, which answers in the original image's pixels
        (segment maps its class map back when the answer is built, so an oversized one is never made)."""

    def to_json(self, result: Result, options: Options, budget: Budget) -> BaseModel:
        """`result` as `result_schema` (the /v1 answer), charging what it adds beyond plain fields to `budget`."""
        return result  # classify and detect results are their /v1 form already

    @abstractmethod
    def tensors(self, results: list[Result]) -> Tensors:
        """The shape and values of each of `outputs` for a batch of results, batch first."""

    def output_tensors(self, results: list[Result]) -> dict[str, OutputTensor]:
        """The Open Inference Protocol outputs of a batch of results, typed as `outputs` declares them."""
        tensors = self.tensors(results)
        return {spec.name: OutputTensor(spec.datatype, *tensors[spec.name]) for spec in self.outputs}


KINDS: dict[str, TaskKind] = {}
"""Every registered kind, by name."""


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make `cls`'s one instance known by its `name`."""
    if cls.name in KINDS:
        raise ValueError(f"task kind {cls.name!r} is registered twice")
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> TaskKind:
    """The registered kind called `name`; a ValueError lists the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; known: {sorted(KINDS)}") from None


def to_host(prediction: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """A prediction on the CPU, floating point as float32."""
    if isinstance(prediction, dict):
        return {name: to_host(value) for name, value in prediction.items()}
    return prediction.float().cpu() if prediction.is_floating_point() else prediction.cpu()
