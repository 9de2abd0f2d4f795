"""Held-out evaluation of a task model with its kind's metric (boxes and masks compared in the model's input pixels)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .kinds import get_kind, to_host
from .task_model import MonaTaskModel


@torch.no_grad()
def evaluate(model: MonaTaskModel, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """The kind's metrics over `loader`."""
    metric = get_kind(model.manifest.kind).metric(len(model.manifest.labels))
    was_training = model.training
    model.eval()
    for images, targets in loader:
        metric.update([to_host(p) for p in model.predict(images.to(device))], targets)
    model.train(was_training)
    return metric.compute()
