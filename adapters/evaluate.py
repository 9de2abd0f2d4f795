"""Held-out evaluation per kind: top-1/top-5, COCO mAP (pycocotools), mean IoU."""

from __future__ import annotations

import contextlib
import io

import torch
from torch.utils.data import DataLoader

from .task_model import MonaTaskModel
from .transforms import IGNORE_INDEX


def _classify(predictions: list[torch.Tensor], labels: torch.Tensor, state: dict) -> None:
    logits = torch.stack(predictions).float()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    state["top1"] = state.get("top1", 0) + (top[:, 0] == labels).sum().item()
    state["top5"] = state.get("top5", 0) + (top == labels[:, None]).any(1).sum().item()
    state["n"] = state.get("n", 0) + len(labels)


def _segment(predictions: list[torch.Tensor], masks: torch.Tensor, state: dict, num_classes: int) -> None:
    predicted = torch.stack(predictions).long().flatten()
    truth = masks.flatten()
    valid = truth != IGNORE_INDEX
    index = truth[valid] * num_classes + predicted[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    state["confusion"] = state.get("confusion", 0) + counts


def _coco_map(ground_truth: list[dict], detections: list[dict], num_classes: int) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations = [], []
    for image_id, target in enumerate(ground_truth, start=1):
        images.append({"id": image_id})
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )
    results = [
        {"image_id": image_id, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        for image_id, output in enumerate(detections, start=1)
        for (x1, y1, x2, y2), score, label in zip(output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist())
    ]
    if not results or not annotations:
        return {"mAP": 0.0, "mAP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": i + 1} for i in range(num_classes)]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP": float(evaluation.stats[0]), "mAP50": float(evaluation.stats[1])}


@torch.no_grad()
def evaluate(model: MonaTaskModel, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """The kind's metrics over `loader` (boxes and masks compared in the model's input pixels)."""
    kind, num_classes = model.manifest.kind, len(model.manifest.labels)
    was_training = model.training
    model.eval()
    state: dict = {}
    truth, detections = [], []
    for images, targets in loader:
        predictions = model.predict(images.to(device))
        if kind == "classify":
            _classify([p.cpu() for p in predictions], targets, state)
        elif kind == "segment":
            _segment([p.cpu() for p in predictions], targets, state, num_classes)
        else:
            truth += targets
            detections += [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in p.items()} for p in predictions]
    model.train(was_training)
    if kind == "classify":
        return {"top1": state["top1"] / state["n"], "top5": state["top5"] / state["n"]}
    if kind == "segment":
        confusion = state["confusion"].double()
        union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
        present = union > 0
        iou = confusion.diag()[present] / union[present]
        return {"mIoU": float(iou.mean()), "pixel_accuracy": float(confusion.diag().sum() / confusion.sum())}
    return _coco_map(truth, detections, num_classes)
