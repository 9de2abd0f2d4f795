"""Classification: one label per image, from the pooled last stage; data: an ImageFolder, VOC2007, Flowers102 or Pets; top-1/top-5."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from ..data.datasets import Sample
from ..heads.classify import ClassifyHead
from ..metrics import TopK
from ..strict import Strict
from ..transforms import InputSpec, Prepared
from .base import Options, OutputSpec, Recipe, TaskKind, Tensors, register_kind


class ClassifyHeadConfig(Strict):
    """Pooled features -> LayerNorm -> Linear over `labels`."""

    type: Literal["linear"] = "linear"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class LabelScore(BaseModel):
    label: str
    index: int
    score: float


class ClassifyResult(BaseModel):
    top: list[LabelScore]


@register_kind
class Classify(TaskKind[ClassifyResult]):
    name = "classify"
    head_config = ClassifyHeadConfig
    result_schema = ClassifyResult
    outputs = (OutputSpec("scores", "FP32", (-1, -1)), OutputSpec("labels", "BYTES", (-1, -1)), OutputSpec("indices", "INT64", (-1, -1)))
    options = ("top_k",)
    recipe = Recipe(drop_path=0.3, weight_decay=0.05, decay_biases=False)  # large_224_det.py; mmcls's Swin AdamW: no decay on norms, biases

    def build_head(self, config: ClassifyHeadConfig, stage_dims: list[int], num_classes: int) -> nn.Module:
        return ClassifyHead(stage_dims[-1], num_classes, dropout=config.dropout)

    def target(self, sample: Sample, prepared: Prepared, flip: bool, spec: InputSpec) -> int:
        return sample.target

    def metric(self, num_classes: int) -> TopK:
        return TopK()

    def result_entries(self, predictions: list[torch.Tensor], options: Options) -> int:
        return sum(min(options.top_k, p.numel()) for p in predictions)

    def postprocess(self, probabilities: torch.Tensor, labels: list[str], prepared: Prepared, options: Options) -> ClassifyResult:
        """The best `options.top_k` labels, best first."""
        scores, indices = probabilities.float().topk(min(options.top_k, probabilities.numel()))
        return ClassifyResult(top=[LabelScore(label=labels[i], index=i, score=s) for s, i in zip(scores.tolist(), indices.tolist())])

    def tensors(self, results: list[ClassifyResult]) -> Tensors:
        shape = [len(results), len(results[0].top)]
        return {
            "scores": (shape, lambda: [[t.score for t in r.top] for r in results]),
            "labels": (shape, lambda: [t.label for r in results for t in r.top]),
            "indices": (shape, lambda: [[t.index for t in r.top] for r in results]),
        }
