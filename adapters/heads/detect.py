"""Detection head: an FPN over the Swin stages and a RetinaNet head, from torchvision's building blocks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .base import stage_inputs, to_nchw

ANCHOR_SIZES = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)

FPN_STAGES = (1, 2, 3)
"""The backbone stages the FPN reads (strides 8, 16, 32), as the official RetinaNet's `out_indices`."""

Detections = dict[str, torch.Tensor]


class DetectHead(nn.Module):
    """RetinaNet on P3-P7: the FPN takes stages 2-4 (strides 8/16/32; with `stage_norm`, each through its own
    frozen affine-free LayerNorm, as the official setup) and adds P6/P7 from P5.

    `forward` gives the raw head outputs and anchors; `loss` the focal + box loss against targets in
    input pixels (xyxy, labels from 0); `predict` the boxes after score threshold, top-k and class-wise NMS.
    """

    def __init__(
        self,
        stage_dims: list[int],
        num_classes: int,
        fpn_channels: int = 256,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        topk_candidates: int = 1000,
        stage_norm: bool = False,
    ) -> None:
        super().__init__()
        self.stage_norm = stage_norm
        self.fpn = FeaturePyramidNetwork(
            [stage_dims[i] for i in FPN_STAGES], fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels)
        )
        self.anchor_generator = AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS)
        self.head = RetinaNetHead(fpn_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.topk_candidates = topk_candidates

    def forward(self, features: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[int]]:
        """Head outputs over all anchors, the anchors of each image, and the anchor count per level."""
        maps = to_nchw(stage_inputs(features, FPN_STAGES, self.stage_norm))
        batch, height, width = maps[0].shape[0], maps[0].shape[2] * 8, maps[0].shape[3] * 8
        pyramid = list(self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps))).values())
        outputs = self.head(pyramid)
        images = ImageList(maps[0].new_zeros(1).expand(batch, 3, height, width), [(height, width)] * batch)
        anchors = self.anchor_generator(images, pyramid)
        per_level = [m.shape[2] * m.shape[3] * self.anchor_generator.num_anchors_per_location()[0] for m in pyramid]
        return outputs, anchors, per_level

    def loss(self, features: list[torch.Tensor], targets: list[Detections]) -> torch.Tensor:
        """Sigmoid focal loss + L1 box loss, as torchvision's RetinaNet computes them."""
        outputs, anchors, _ = self(features)
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            if target["boxes"].numel() == 0:
                matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=anchors_per_image.device))
            else:
                matched.append(self.matcher(box_iou(target["boxes"], anchors_per_image)))
        losses = self.head.compute_loss(targets, outputs, anchors, matched)
        return losses["classification"] + losses["bbox_regression"]

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> list[Detections]:
        """Boxes (xyxy in input pixels), scores and labels for each image."""
        outputs, anchors, per_level = self(features)
        size = (features[0].shape[1] * 4, features[0].shape[2] * 4)
        logits = outputs["cls_logits"].split(per_level, dim=1)
        regression = outputs["bbox_regression"].split(per_level, dim=1)
        results = []
        for i, image_anchors in enumerate(anchors):
            boxes, scores, labels = [], [], []
            for level_logits, level_regression, level_anchors in zip(logits, regression, image_anchors.split(per_level)):
                num_classes = level_logits.shape[-1]
                level_scores = level_logits[i].sigmoid().flatten()
                keep = torch.where(level_scores > self.score_threshold)[0]
                level_scores, order = level_scores[keep].topk(min(self.topk_candidates, keep.numel()))
                keep = keep[order]
                anchor_index = torch.div(keep, num_classes, rounding_mode="floor")
                decoded = self.box_coder.decode_single(level_regression[i][anchor_index], level_anchors[anchor_index])
                boxes.append(clip_boxes_to_image(decoded, size))
                scores.append(level_scores)
                labels.append(keep % num_classes)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_nms(boxes, scores, labels, self.nms_threshold)[: self.max_detections]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
