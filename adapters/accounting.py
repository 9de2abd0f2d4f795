"""How many parameters Mona adds per task, by the reference code and by the paper's eq. (6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from timm.models.swin_transformer import SwinTransformer

from .bank import MonaBank
from .config_args import option
from .mona import INNER_DIM
from .swin import BackboneOptions, block_dims

ADAPTERS_PER_BLOCK = 2


@dataclass
class InfoConfig(BackboneOptions):
    """Everything `monaserve info` takes."""

    inner_dim: int = option(INNER_DIM, "Mona inner dimension")
    num_classes: int = option(1000, "classes for the classify head figure")
    json: bool = option(False, "print JSON")


def mona_parameters(dim: int, inner_dim: int = INNER_DIM) -> int:
    """Parameters of one reference Mona of width m=`dim`: (2n+5)m + n^2 + 88n."""
    m, n = dim, inner_dim
    return (2 * n + 5) * m + n * n + 88 * n


def folded_parameters(dim: int, inner_dim: int = INNER_DIM) -> int:
    """Values one folded Mona keeps in a GPU slot (A and B are both n x m, so more than the reference)."""
    return sum(math.prod(shape) for shape in MonaBank.slot_shapes(dim, inner_dim).values())


def paper_eq6_parameters(dim: int, inner_dim: int = INNER_DIM) -> int:
    """The paper's eq. (6), (2n+3)m + n^2 + 84n + 2: scalar scales, no depthwise biases."""
    m, n = dim, inner_dim
    return (2 * n + 3) * m + n * n + 84 * n + 2


@dataclass(frozen=True)
class AdapterBudget:
    """Per-task adapter size against the frozen backbone it rides on."""

    backbone_parameters: int
    num_blocks: int
    mona_parameters: int
    paper_eq6_parameters: int
    folded_parameters: int

    @property
    def num_adapters(self) -> int:
        return self.num_blocks * ADAPTERS_PER_BLOCK

    @property
    def mona_percent(self) -> float:
        return 100.0 * self.mona_parameters / self.backbone_parameters

    @property
    def paper_eq6_percent(self) -> float:
        return 100.0 * self.paper_eq6_parameters / self.backbone_parameters


def adapter_budget(model: SwinTransformer, inner_dim: int = INNER_DIM) -> AdapterBudget:
    """Count a task's Mona parameters for `model`, a headless Swin without adapters (meta device is fine)."""
    dims = [dim for _, dim in block_dims(model)]
    backbone = sum(p.numel() for name, p in model.named_parameters() if ".mona" not in name)
    return AdapterBudget(
        backbone_parameters=backbone,
        num_blocks=len(dims),
        mona_parameters=ADAPTERS_PER_BLOCK * sum(mona_parameters(d, inner_dim) for d in dims),
        paper_eq6_parameters=ADAPTERS_PER_BLOCK * sum(paper_eq6_parameters(d, inner_dim) for d in dims),
        folded_parameters=ADAPTERS_PER_BLOCK * sum(folded_parameters(d, inner_dim) for d in dims),
    )
