"""Detection: boxes with labels, from an FPN + RetinaNet head; data: COCO json or Pascal VOC; COCO mAP."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torchvision.ops import nms

from ..data.datasets import Sample
from ..heads.detect import DetectHead
from ..metrics import CocoMap
from ..strict import Strict
from ..transforms import InputSpec, Prepared, prepare_boxes
from .base import Options, OutputSpec, Recipe, TaskKind, Tensors, register_kind

DEFAULT_MIN_SCORE = 0.3
"""The answers' lowest box score where a package names none (trained before the trainer picked one)."""


class DetectHeadConfig(Strict):
    """FPN + RetinaNet over `labels` (object classes, no background)."""

    type: Literal["retinanet"] = "retinanet"
    fpn_channels: int = Field(default=256, ge=8, le=1024)
    stage_norm: bool = Field(
        default=False,
        description="each backbone stage the head reads goes through its own LayerNorm at weight 1 and bias 0, as in the official "
        "setup; `monaserve train` turns it on, packages trained before it have it off and read the stages raw",
    )
    score_threshold: float = Field(default=0.05, ge=0.0, le=1.0, description="the head's candidates: boxes scoring less never leave it")
    nms_threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=1000)
    min_score: float = Field(
        default=DEFAULT_MIN_SCORE,
        ge=0.0,
        le=1.0,
        description="the lowest score an answer shows unless the request says otherwise; the trainer picks it on validation data (best F1)",
    )
    class_agnostic: bool = Field(
        default=False,
        description="answers keep one box per object, whatever its label, unless the request says otherwise; "
        "the trainer turns it on where that gives the better F1 on validation data",
    )


class Detection(BaseModel):
    label: str
    index: int
    score: float
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in the original image's pixels")


class DetectResult(BaseModel):
    width: int
    height: int
    detections: list[Detection]


@register_kind
class Detect(TaskKind[DetectResult]):
    name = "detect"
    head_config = DetectHeadConfig
    result_schema = DetectResult
    outputs = (
        OutputSpec("boxes", "FP32", (-1, -1, 4)),
        OutputSpec("scores", "FP32", (-1, -1)),
        OutputSpec("labels", "BYTES", (-1, -1)),
        OutputSpec("indices", "INT64", (-1, -1)),
        OutputSpec("num_detections", "INT32", (-1,)),
    )
    options = ("min_score", "max_detections", "class_agnostic")
    recipe = Recipe(drop_path=0.2, weight_decay=0.05, decay_biases=True)  # voc_retinanet_swin_large_1x_mona.py

    def default_head(self, channels: int) -> DetectHeadConfig:
        return DetectHeadConfig(fpn_channels=channels, stage_norm=True)

    def build_head(self, config: DetectHeadConfig, stage_dims: list[int], num_classes: int) -> nn.Module:
        return DetectHead(
            stage_dims,
            num_classes,
            fpn_channels=config.fpn_channels,
            score_threshold=config.score_threshold,
            nms_threshold=config.nms_threshold,
            max_detections=config.max_detections,
            stage_norm=config.stage_norm,
        )

    def target(self, sample: Sample, prepared: Prepared, flip: bool, spec: InputSpec) -> dict[str, torch.Tensor]:
        boxes = sample.target["boxes"].clone()
        if flip:
            boxes[:, [0, 2]] = prepared.original_size[1] - boxes[:, [2, 0]]
        return dict(sample.target, boxes=prepare_boxes(boxes, prepared))

    def metric(self, num_classes: int) -> CocoMap:
        return CocoMap(num_classes)

    def tune_head(self, head: DetectHeadConfig, evaluation: dict[str, float]) -> DetectHeadConfig:
        """The answers' defaults of the best F1 on validation data, where any box was right: the lowest score,
        and one box per object where that scores better than the head's boxes as they come (ties: as they come)."""
        f1, agnostic = max((evaluation.get("f1", 0.0), False), (evaluation.get("f1_agnostic", 0.0), True), key=lambda pick: pick[0])
        if f1 <= 0.0:
            return head
        min_score = evaluation["f1_agnostic_min_score" if agnostic else "f1_min_score"]
        return head.model_copy(update={"min_score": max(head.score_threshold, min_score), "class_agnostic": agnostic})

    def defaults(self, head: DetectHeadConfig) -> Options:
        return Options(
            min_score=head.min_score, max_detections=head.max_detections, class_agnostic=head.class_agnostic, overlap=head.nms_threshold
        )

    def result_entries(self, predictions: list[dict[str, torch.Tensor]], options: Options) -> int:
        return sum(min(len(p["scores"]), options.max_detections) for p in predictions)

    def postprocess(self, output: dict[str, torch.Tensor], labels: list[str], prepared: Prepared, options: Options) -> DetectResult:
        """The best `options.max_detections` boxes scoring at least `options.min_score` (with `class_agnostic`,
        one box per object: of boxes overlapping more than `options.overlap`, whatever their labels, the
        best), mapped back to the original image (xyxy pixels), best first."""
        scores = output["scores"]
        keep = torch.nonzero(scores >= options.min_score).flatten()  # the head gives them best first
        if options.class_agnostic:
            keep = keep[nms(output["boxes"][keep].float(), scores[keep].float(), options.overlap)]
        keep = keep[: options.max_detections]
        boxes = prepared.boxes_to_original(output["boxes"][keep])
        detections = [
            Detection(label=labels[label], index=label, score=score, box=[round(v, 2) for v in box])
            for box, score, label in zip(boxes.tolist(), scores[keep].tolist(), output["labels"][keep].tolist())
        ]
        height, width = prepared.original_size
        return DetectResult(width=width, height=height, detections=detections)

    def tensors(self, results: list[DetectResult]) -> Tensors:
        """Boxes, scores, labels and indices padded to the most detections of any image; `num_detections` says how many are real."""
        n, m = len(results), max(len(r.detections) for r in results)

        def padded(field: str, dtype: type, width: tuple[int, ...] = ()) -> np.ndarray:
            values = np.zeros((n, m, *width), dtype)
            for i, result in enumerate(results):
                for j, detection in enumerate(result.detections):
                    values[i, j] = getattr(detection, field)
            return values

        def labels() -> list[str]:
            return [r.detections[j].label if j < len(r.detections) else "" for r in results for j in range(m)]

        return {
            "boxes": ([n, m, 4], lambda: padded("box", np.float32, (4,))),
            "scores": ([n, m], lambda: padded("score", np.float32)),
            "labels": ([n, m], labels),
            "indices": ([n, m], lambda: padded("index", np.int64)),
            "num_detections": ([n], lambda: [len(r.detections) for r in results]),
        }
