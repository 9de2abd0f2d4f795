"""Classification head: pooled final features -> LayerNorm -> Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..swin import NORMED_LAST


class ClassifyHead(nn.Module):
    """One task's classifier over the backbone's last (normed) stage, average-pooled."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits `(B, num_classes)` from the pyramid's levels; only the last stage, through the final norm, is used."""
        pooled = features[NORMED_LAST].mean(dim=(1, 2))
        return self.fc(self.dropout(self.norm(pooled)))

    def loss(self, features: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(features), labels)

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class probabilities (softmax over the logits), one row per image."""
        return list(self(features).float().softmax(dim=-1))
