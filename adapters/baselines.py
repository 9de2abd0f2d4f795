"""Training methods as data: Mona and the Mona paper's baselines, each as the official code defines it on Swin.

The official definitions are the backbones of https://github.com/Leiyi-Hu/mona (`mmdet/models/backbones/
swin_transformer_{fixed,bitfit,norm_tuning,partial_1,adapter,lora,adaptformer}.py`, the same in its
classification and segmentation trees, and `lora_layers.py`). Every method but `mona` first makes each Mona the
exact identity and freezes it, so the model is the plain pretrained Swin the baselines start from; then it adds
its own modules where the official code puts them, and unfreezes what the official code trains. The head always
trains. Only `mona` and `head-only` leave the shared backbone as it was, so only their result is a servable
package; the others write a report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from .mona import init_projection
from .swin import MonaSwinBlock, adapter_modules, block_dims
from .task_model import MonaTaskModel

MONA = ".mona"
"""What every Mona parameter's name holds (`layers.0.blocks.0.mona1.project1.weight`)."""

BOTTLENECK_WIDTH = 64
"""Inner width of the official Adapter and AdaptFormer (`nn.Linear(in_dim, 64)`)."""

BOTTLENECK_DROPOUT = 0.1
"""Dropout after their GELU (`nn.Dropout(p=0.1)`)."""

ADAPTFORMER_SCALE = 0.1
"""The fixed scale of AdaptFormer's branch (`self.scale = 0.1`)."""

LORA_RANK = 64
"""Rank of each LoRA update (`MergedLinear(dim, dim * 3, r=64, ...)`)."""

LORA_ALPHA = 1
"""LoRA's alpha (`lora_layers`' default, which the official Swin keeps): updates are scaled by alpha / rank."""


class Bottleneck(nn.Module):
    """Down to 64, GELU, dropout, up, times `scale`: the branch of the official Adapter (scale 1) and AdaptFormer (0.1).

    Initialised as the official `init_weights` leaves every Linear (truncated-normal weights, std 0.02, zero
    biases), so the branch starts small but not zero.
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.project1 = nn.Linear(dim, BOTTLENECK_WIDTH)
        self.dropout = nn.Dropout(p=BOTTLENECK_DROPOUT)
        self.project2 = nn.Linear(BOTTLENECK_WIDTH, dim)
        self.scale = scale
        for projection in (self.project1, self.project2):
            init_projection(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.project2(self.dropout(F.gelu(self.project1(x))))


class AdapterSwinBlock(MonaSwinBlock):
    """The official Adapter's block: a residual bottleneck on the attention branch and on the MLP branch, each
    before its drop path and residual (`x = shortcut + drop_path(my_module_1(attn))`, likewise `my_module_2`).

    The official files build both with `Adapter(dim, 2)` for a constructor that takes `dim` alone; the paper's
    description (a linear bottleneck after MSA and after MLP) and the forward decide: one 64-wide bottleneck each.
    """

    adapter1: Bottleneck
    adapter2: Bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self._attn(self.norm1(x))
        x = self.mona1(x + self.drop_path1(attn + self.adapter1(attn)))
        mlp = self.mlp(self.norm2(x))
        return self.mona2(x + self.drop_path2(mlp + self.adapter2(mlp)))


class AdaptFormerSwinBlock(MonaSwinBlock):
    """The official AdaptFormer's block: a bottleneck scaled by 0.1 beside the MLP, fed the MLP sub-layer's input
    before its norm, and added with the MLP's residual (`x = identity + drop_path(mlp(norm2(identity))) + adapt_x`)."""

    adaptmlp: Bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mona1(x + self.drop_path1(self._attn(self.norm1(x))))
        return self.mona2(x + self.drop_path2(self.mlp(self.norm2(x))) + self.adaptmlp(x))


class LoRAQKV(nn.Linear):
    """timm's fused qkv projection with the official LoRA (`lora_layers.MergedLinear`, `enable_lora=[True, False,
    True]`): a rank-64 update of q and one of v, none of k, scaled by alpha / rank = 1/64.

    `lora_A` holds q's and then v's down projection `(2r, dim)`, `lora_B` their up projections `(2 dim, r)`, as the
    official parameters do; `lora_A` is Kaiming-uniform and `lora_B` zero, so it starts as the frozen projection
    (the official `init_weights` re-initialises only a Linear's `weight` and `bias`).
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    @classmethod
    def convert(cls, qkv: nn.Linear) -> None:
        """Give `qkv` its LoRA parameters and make it a `LoRAQKV`, in place (its own names stay as they are)."""
        qkv.lora_A = nn.Parameter(torch.empty(2 * LORA_RANK, qkv.in_features, device=qkv.weight.device))
        qkv.lora_B = nn.Parameter(torch.zeros(2 * qkv.out_features // 3, LORA_RANK, device=qkv.weight.device))
        nn.init.kaiming_uniform_(qkv.lora_A, a=math.sqrt(5))
        qkv.__class__ = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_down, v_down = F.linear(x, self.lora_A).chunk(2, dim=-1)
        q_up, v_up = self.lora_B.chunk(2)
        q, v = F.linear(q_down, q_up), F.linear(v_down, v_up)
        return super().forward(x) + torch.cat([q, torch.zeros_like(q), v], dim=-1) * (LORA_ALPHA / LORA_RANK)


def adapter_blocks(backbone: SwinTransformer) -> None:
    """Make every block an `AdapterSwinBlock`, with a bottleneck after its attention and one after its MLP."""
    swap_blocks(backbone, AdapterSwinBlock, lambda dim: {"adapter1": Bottleneck(dim), "adapter2": Bottleneck(dim)})


def adaptformer_blocks(backbone: SwinTransformer) -> None:
    """Make every block an `AdaptFormerSwinBlock`, with a bottleneck scaled by 0.1 beside its MLP."""
    swap_blocks(backbone, AdaptFormerSwinBlock, lambda dim: {"adaptmlp": Bottleneck(dim, ADAPTFORMER_SCALE)})


def lora_projections(backbone: SwinTransformer) -> None:
    """Give every block's qkv projection its LoRA updates of q and v."""
    for path, _ in block_dims(backbone):
        LoRAQKV.convert(backbone.get_submodule(f"{path}.attn.qkv"))


def swap_blocks(backbone: SwinTransformer, block_class: type[MonaSwinBlock], modules: Callable[[int], dict[str, nn.Module]]) -> None:
    """Add `modules(width)` to every block (on its device) and make it a `block_class`, in place, as `inject_mona` does."""
    for path, dim in block_dims(backbone):
        block = backbone.get_submodule(path)
        for name, module in modules(dim).items():
            setattr(block, name, module.to(block.norm1.weight.device))
        block.__class__ = block_class


def silence_monas(backbone: SwinTransformer) -> None:
    """Make every Mona the exact identity (`project2` zeroed: it adds nothing to its input) and freeze it."""
    with torch.no_grad():
        for mona in adapter_modules(backbone).values():
            mona.project2.weight.zero_()
            mona.project2.bias.zero_()
            mona.requires_grad_(False)


Selector = Callable[[SwinTransformer, str], bool]
"""Whether the pretrained backbone's parameter called `name` trains (`backbone` tells where its blocks are)."""


def nothing(backbone: SwinTransformer, name: str) -> bool:
    """No pretrained weight trains."""
    return False


def everything(backbone: SwinTransformer, name: str) -> bool:
    """Every pretrained weight trains."""
    return True


def biases(backbone: SwinTransformer, name: str) -> bool:
    """BitFit: the official `'bias' in name`, which holds the relative position bias tables as well as every bias."""
    return "bias" in name


def norms(backbone: SwinTransformer, name: str) -> bool:
    """NormTuning: the official `'norm' in name`, on a timm Swin exactly its LayerNorms' weights and biases."""
    return "norm" in name


def last_block(backbone: SwinTransformer, name: str) -> bool:
    """Partial-1: the official `'layers.3.blocks.1' in name`, the last block of the last stage of every Swin."""
    return name.startswith(block_dims(backbone)[-1][0] + ".")


@dataclass(frozen=True)
class Modules:
    """A method's own modules: how they go into the backbone, and how the report names their parameters."""

    label: str
    names: frozenset[str]  # their attribute names: a parameter is theirs where its dotted name has one of them
    inject: Callable[[SwinTransformer], None]


@dataclass(frozen=True)
class TrainingMethod:
    """One way to train a task: its name, what trains, whether the result is a servable package, and its setup."""

    name: str
    trains: str
    servable: bool = False
    trains_mona: bool = False
    backbone: Selector = nothing
    modules: Modules | None = None

    def prepare(self, model: MonaTaskModel) -> None:
        """Set `model` up for this method: Monas silenced (unless it trains them), its modules in, what trains unfrozen."""
        if not self.trains_mona:
            silence_monas(model.backbone)
        if self.modules is not None:
            self.modules.inject(model.backbone)
        for name, parameter in model.backbone.named_parameters():
            if MONA not in name:
                parameter.requires_grad_(self.backbone(model.backbone, name) or self.owns(name))

    def owns(self, name: str) -> bool:
        """Whether the parameter called `name` is one of this method's own modules'."""
        return self.modules is not None and not self.modules.names.isdisjoint(name.split("."))

    def part(self, name: str) -> str:
        """The part of the model a parameter belongs to, for the report: head, this method's modules, Mona or backbone."""
        if name.startswith("head."):
            return "head"
        if self.owns(name):
            return self.modules.label
        return "Mona" if MONA in name else "backbone"

    def trainable_counts(self, model: MonaTaskModel) -> dict[str, int]:
        """Trainable parameters per part of `model`, in the model's order (the backbone's parts, then the head)."""
        counts: dict[str, int] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                part = self.part(name)
                counts[part] = counts.get(part, 0) + parameter.numel()
        return counts


METHODS: dict[str, TrainingMethod] = {
    method.name: method
    for method in (
        TrainingMethod("mona", "Mona after every attention and MLP residual, and the head", servable=True, trains_mona=True),
        TrainingMethod("head-only", "the head alone (the paper's FIXED); the Monas are frozen identities", servable=True),
        TrainingMethod("full", "every backbone weight and the head (the paper's FULL)", backbone=everything),
        TrainingMethod("bitfit", "every backbone bias and relative position bias table, and the head", backbone=biases),
        TrainingMethod("norm-tuning", "every backbone LayerNorm's weight and bias, and the head (the paper's LN)", backbone=norms),
        TrainingMethod("partial-1", "the backbone's last block, and the head", backbone=last_block),
        TrainingMethod(
            "adapter",
            "a bottleneck (64, GELU) on each block's attention and MLP branch, and the head",
            modules=Modules("Adapter", frozenset({"adapter1", "adapter2"}), adapter_blocks),
        ),
        TrainingMethod(
            "lora",
            "rank-64 LoRA on q and v of each block's qkv projection, and the head",
            modules=Modules("LoRA", frozenset({"lora_A", "lora_B"}), lora_projections),
        ),
        TrainingMethod(
            "adaptformer",
            "a bottleneck (64, GELU) scaled by 0.1 beside each block's MLP, and the head",
            modules=Modules("AdaptFormer", frozenset({"adaptmlp"}), adaptformer_blocks),
        ),
    )
}
"""Every training method `monaserve train --baseline` takes, by name."""


def get_method(name: str) -> TrainingMethod:
    """The method called `name`; an error that lists them all otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; the methods: {', '.join(METHODS)}")
    return METHODS[name]
