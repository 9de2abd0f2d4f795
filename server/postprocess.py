"""Turning head outputs into response results."""

from __future__ import annotations

import torch

from monaserve.adapters import Manifest

from .schemas import ClassifyResult, LabelScore


def classify(logits: torch.Tensor, manifest: Manifest, top_k: int) -> ClassifyResult:
    """Softmax over the task's labels, best `top_k` first."""
    probabilities = logits.float().softmax(dim=-1)
    scores, indices = probabilities.topk(min(top_k, probabilities.numel()))
    return ClassifyResult(
        top=[
            LabelScore(label=manifest.labels[i], index=i, score=s)
            for s, i in zip(scores.tolist(), indices.tolist())
        ]
    )
