"""Held-out metrics, fed batch by batch: top-1/top-5, COCO mAP (pycocotools), mean IoU."""

from __future__ import annotations

import contextlib
import io

import torch

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
        if not results or not annotations:
            return {"mAP": 0.0, "mAP50": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            truth = COCO()
            truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i + 1} for i in range(self.num_classes)]}
            truth.createIndex()
            evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return {"mAP": float(evaluation.stats[0]), "mAP50": float(evaluation.stats[1])}


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
