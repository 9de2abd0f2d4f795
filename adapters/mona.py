"""Mona, the multi-cognitive visual adapter (Yin et al., CVPR 2025), and its folded inference form.

`Mona` is the trainable module, equal to the paper's reference: scaled LayerNorm, down projection,
depthwise 3x3/5x5/7x7 filters averaged plus identity, 1x1 aggregation plus identity, GELU, dropout,
up projection and a residual. `fold_mona` turns one trained `Mona` into `FoldedMona`, the same function
with fewer operations: one 7x7 depthwise kernel, one 1x1 with the identity inside, and the LayerNorm's
affine and both scales inside the down projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

INNER_DIM = 64
"""Width of Mona's bottleneck (the paper's n)."""

PROJECTION_INIT_STD = 0.02
"""Standard deviation of the projections' initial weights (timm's `trunc_normal_(std=.02)` in the official `init_weights`)."""

FOLDED_KERNEL = 7
"""Side of the single depthwise kernel the three filters fold into."""


@torch.no_grad()
def init_projection(linear: nn.Linear) -> None:
    """A Linear as the official Mona code's `init_weights` leaves every one: truncated-normal weights with std 0.02
    (timm's `trunc_normal_`, cut at +-2), zero biases."""
    nn.init.trunc_normal_(linear.weight, std=PROJECTION_INIT_STD, a=-2.0, b=2.0)
    nn.init.zeros_(linear.bias)


class MonaOp(nn.Module):
    """Multi-cognitive filters on NCHW maps: depthwise 3/5/7 averaged plus identity, then 1x1 plus identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=5, padding=2, groups=channels)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.projector = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return x + self.projector(x)


class Mona(nn.Module):
    """One Mona adapter on NHWC features `(B, H, W, dim)`, returning the same shape.

    Parameter names follow the reference implementation so its checkpoints map one to one, and so does
    the initialisation (`reset_parameters`).
    """

    def __init__(self, dim: int, inner_dim: int = INNER_DIM, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.project1 = nn.Linear(dim, inner_dim)
        self.adapter_conv = MonaOp(inner_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.project2 = nn.Linear(inner_dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official `init_weights`: projections truncated-normal with std 0.02 and zero biases, so an untrained
        Mona moves its input by about 2% of its size (PyTorch's default would move it by 26% at width 96); the
        LayerNorm at weight 1 and bias 0, and the convolutions at PyTorch's defaults, as the official code leaves them."""
        for projection in (self.project1, self.project2):
            init_projection(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * self.gamma + x * self.gammax
        h = self.project1(h).permute(0, 3, 1, 2)
        h = self.adapter_conv(h).permute(0, 2, 3, 1)
        h = self.dropout(F.gelu(h))
        return x + self.project2(h)


class FoldedMona(NamedTuple):
    """One Mona in inference form, for input width m and inner width n.

    z = A @ LN(x) + B @ x + c   (LN without affine; A, B: (n, m))
    h = depthwise7x7(z)         (kernel (n, 7, 7) with the identity at its centre)
    p = P @ h + d               (P: (n, n) with the identity added)
    y = x + U @ gelu(p) + e     (U: (m, n))
    """

    scaled_down: torch.Tensor
    direct_down: torch.Tensor
    down_bias: torch.Tensor
    depthwise: torch.Tensor
    depthwise_bias: torch.Tensor
    projector: torch.Tensor
    projector_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor


def _pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a square depthwise kernel `(C, 1, k, k)` to `(C, 1, size, size)`, centred."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


def fold_mona(mona: Mona) -> FoldedMona:
    """Fold a trained `Mona` into `FoldedMona`; computed in float64, returned in float32."""
    return fold_mona_state(mona.state_dict())


@torch.no_grad()
def fold_mona_state(state: Mapping[str, torch.Tensor]) -> FoldedMona:
    """`fold_mona` on a `Mona` state dict (names as in `Mona.state_dict()`), without building the module."""
    p = {name: t.detach().to(torch.float64) for name, t in state.items()}
    w1, b1 = p["project1.weight"], p["project1.bias"]
    ln_scale = p["norm.weight"] * p["gamma"]
    scaled_down = w1 * ln_scale
    direct_down = w1 * p["gammax"]
    down_bias = w1 @ (p["norm.bias"] * p["gamma"]) + b1

    kernels = [_pad_to(p[f"adapter_conv.conv{i}.weight"], FOLDED_KERNEL) for i in (1, 2, 3)]
    depthwise = (sum(kernels) / 3.0)[:, 0]
    centre = FOLDED_KERNEL // 2
    depthwise[:, centre, centre] += 1.0
    depthwise_bias = sum(p[f"adapter_conv.conv{i}.bias"] for i in (1, 2, 3)) / 3.0

    projector = p["adapter_conv.projector.weight"][:, :, 0, 0]
    projector = projector + torch.eye(projector.shape[0], dtype=projector.dtype)
    folded = FoldedMona(
        scaled_down=scaled_down,
        direct_down=direct_down,
        down_bias=down_bias,
        depthwise=depthwise,
        depthwise_bias=depthwise_bias,
        projector=projector,
        projector_bias=p["adapter_conv.projector.bias"],
        up=p["project2.weight"],
        up_bias=p["project2.bias"],
    )
    return FoldedMona(*(t.to(torch.float32) for t in folded))
