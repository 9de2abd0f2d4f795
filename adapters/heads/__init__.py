"""Task heads, built from a manifest's head config."""

from __future__ import annotations

from torch import nn

from ..manifest import Manifest
from .classify import ClassifyHead

__all__ = ["ClassifyHead", "build_head"]


def build_head(manifest: Manifest, in_dim: int) -> nn.Module:
    """The head a manifest describes, over backbone features of width `in_dim`."""
    if manifest.kind == "classify":
        return ClassifyHead(in_dim, len(manifest.labels), dropout=manifest.head.dropout)
    raise ValueError(f"no head for task kind {manifest.kind!r}")
