"""Held-out metrics, fed batch by batch: top-1/top-5, COCO mAP (pycocotools), mean IoU."""

from __future__ import annotations

import contextlib
import io

import torch
from torchvision.ops import box_iou, nms

from .transforms import IGNORE_INDEX


class TopK:
    """Top-1 and top-5 accuracy of class probabilities against class indices."""

    def __init__(self) -> None:
        self.top1 = self.top5 = self.n = 0

    def update(self, predictions: list[torch.Tensor], labels: torch.Tensor) -> None:
        probabilities = torch.stack(predictions).float()
        top = probabilities.topk(min(5, probabilities.shape[1]), dim=1).indices
        self.top1 += (top[:, 0] == labels).sum().item()
        self.top5 += (top == labels[:, None]).any(1).sum().item()
        self.n += len(labels)

    def compute(self) -> dict[str, float]:
        return {"top1": self.top1 / self.n, "top5": self.top5 / self.n}


AGNOSTIC_IOU = 0.5
"""The IoU of the class-agnostic NMS the evaluation tries: a detect head's own NMS IoU, as the trainer builds it."""


class CocoMap:
    """COCO box mAP and mAP@0.5 of detections against targets (xyxy, labels from 0), by pycocotools."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.truth: list[dict[str, torch.Tensor]] = []
        self.detections: list[dict[str, torch.Tensor]] = []

    def update(self, predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        self.truth += targets
        self.detections += predictions

    def compute(self) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, annotations = [], []
        for image_id, target in enumerate(self.truth, start=1):
            images.append({"id": image_id})
            for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        results = [
            {"image_id": image_id, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
            for image_id, output in enumerate(self.detections, start=1)
            for (x1, y1, x2, y2), score, label in zip(output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist())
        ]
        picks = self.answer_picks()
        if not results or not annotations:
            return {"mAP": 0.0, "mAP50": 0.0, **picks}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            truth = COCO()
            truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i + 1} for i in range(self.num_classes)]}
            truth.createIndex()
            evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return {"mAP": float(evaluation.stats[0]), "mAP50": float(evaluation.stats[1]), **picks}

    def answer_picks(self) -> dict[str, float]:
        """The best F1 of the boxes as the head gives them, and with one box per object (class-agnostic NMS at
        IoU `AGNOSTIC_IOU`), each with its lowest score: what the trainer picks a task's answer defaults from."""
        f1, min_score = best_f1(self.detections, self.truth, self.num_classes)
        agnostic = [one_box_per_object(found, AGNOSTIC_IOU) for found in self.detections]
        f1_agnostic, agnostic_min_score = best_f1(agnostic, self.truth, self.num_classes)
        return {"f1": f1, "f1_min_score": min_score, "f1_agnostic": f1_agnostic, "f1_agnostic_min_score": agnostic_min_score}


def one_box_per_object(found: dict[str, torch.Tensor], overlap: float) -> dict[str, torch.Tensor]:
    """Of boxes that overlap more than `overlap` (IoU), whatever their labels, the best: class-agnostic NMS."""
    keep = nms(found["boxes"].float(), found["scores"].float(), overlap)
    return {name: values[keep] for name, values in found.items()}


def best_f1(
    detections: list[dict[str, torch.Tensor]], truth: list[dict[str, torch.Tensor]], num_classes: int, iou: float = 0.5
) -> tuple[float, float]:
    """The best F1 of boxes against the truth over every lowest score an answer could show, and that score.

    Each box, best first within its image and label, matches the unmatched true box of its label it
    overlaps most at IoU `iou` or more (COCO's rule); the score that keeps the boxes down to the k-th
    best overall scores k boxes with their matches. (0, 0) where no box matches."""
    scored: list[tuple[float, bool]] = []
    for found, true in zip(detections, truth):
        for label in range(num_classes):
            boxes, scores = found["boxes"][found["labels"] == label], found["scores"][found["labels"] == label]
            true_boxes = true["boxes"][true["labels"] == label]
            matched = torch.zeros(len(true_boxes), dtype=torch.bool)
            overlaps = box_iou(boxes.float(), true_boxes.float()) if len(true_boxes) else None
            for i in scores.argsort(descending=True).tolist():
                hit = False
                if overlaps is not None:
                    candidates = overlaps[i].masked_fill(matched, -1.0)
                    best = int(candidates.argmax())
                    hit = bool(candidates[best] >= iou)
                    matched[best] |= hit
                scored.append((float(scores[i]), hit))
    truths = sum(len(t["boxes"]) for t in truth)
    if not scored or not truths:
        return 0.0, 0.0
    scored.sort(key=lambda pair: -pair[0])
    score = torch.tensor([s for s, _ in scored])
    hits = torch.tensor([h for _, h in scored], dtype=torch.float64).cumsum(0)
    f1 = 2 * hits / (torch.arange(1, len(scored) + 1) + truths)  # 2PR/(P+R) = 2·tp/(found + true)
    last_of_score = torch.cat([score[1:] != score[:-1], torch.tensor([True])])  # a threshold keeps ties together
    f1 = f1.masked_fill(~last_of_score, -1.0)
    best = int(f1.argmax())
    return (float(f1[best]), float(score[best])) if f1[best] > 0 else (0.0, 0.0)


class ConfusionIoU:
    """Mean IoU over the classes present, and pixel accuracy, of class maps against masks (`IGNORE_INDEX` left out)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: list[torch.Tensor], masks: torch.Tensor) -> None:
        predicted = torch.stack(predictions).long().flatten()
        truth = masks.flatten()
        valid = truth != IGNORE_INDEX
        index = truth[valid] * self.num_classes + predicted[valid]
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.double()
        union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
        present = union > 0
        iou = confusion.diag()[present] / union[present]
        return {"mIoU": float(iou.mean()), "pixel_accuracy": float(confusion.diag().sum() / confusion.sum())}
