"""A bank of folded Mona adapters for one position in the backbone: K task slots, chosen per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mona import FOLDED_KERNEL, FoldedMona


class MonaBank(nn.Module):
    """K folded Mona adapters of width `dim`; each sample of a batch goes through its own slot.

    Slots live in non-persistent buffers (stacked along a leading slot axis) so they follow the
    module's device and dtype but never enter the backbone's state dict. An empty slot is all zeros,
    which makes it the identity.
    """

    def __init__(self, dim: int, inner_dim: int, num_slots: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.inner_dim, self.num_slots, self.eps = dim, inner_dim, num_slots, eps
        for name, shape in self.slot_shapes(dim, inner_dim).items():
            self.register_buffer(name, torch.zeros(num_slots, *shape), persistent=False)

    @staticmethod
    def slot_shapes(dim: int, inner_dim: int) -> dict[str, tuple[int, ...]]:
        """Shape of each `FoldedMona` field for one slot."""
        m, n, k = dim, inner_dim, FOLDED_KERNEL
        return {
            "scaled_down": (n, m),
            "direct_down": (n, m),
            "down_bias": (n,),
            "depthwise": (n, k, k),
            "depthwise_bias": (n,),
            "projector": (n, n),
            "projector_bias": (n,),
            "up": (m, n),
            "up_bias": (m,),
        }

    @torch.no_grad()
    def write(self, slot: int, folded: FoldedMona) -> None:
        """Place one task's folded adapter in `slot`."""
        for name, value in folded._asdict().items():
            getattr(self, name)[slot].copy_(value)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Reset `slot` to the identity."""
        for name in FoldedMona._fields:
            getattr(self, name)[slot].zero_()

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Adapt NHWC `x` `(B, H, W, dim)`; `slots` `(B,)` holds each sample's slot id."""
        if slots is None:
            raise ValueError("MonaBank needs one slot id per sample")
        b, h, w, m = x.shape
        n = self.inner_dim
        tokens = x.reshape(b, h * w, m)
        normed = F.layer_norm(tokens, (m,), eps=self.eps)
        z = torch.baddbmm(self.down_bias[slots].unsqueeze(1), normed, self.scaled_down[slots].transpose(1, 2))
        z = torch.baddbmm(z, tokens, self.direct_down[slots].transpose(1, 2))
        # Per-sample depthwise kernels: fold the batch into the channel axis and use groups=B*n.
        z = z.transpose(1, 2).reshape(1, b * n, h, w)
        kernel = self.depthwise[slots].reshape(b * n, 1, FOLDED_KERNEL, FOLDED_KERNEL)
        z = F.conv2d(z, kernel, self.depthwise_bias[slots].reshape(b * n), padding=FOLDED_KERNEL // 2, groups=b * n)
        z = z.reshape(b, n, h * w)
        z = torch.baddbmm(self.projector_bias[slots].unsqueeze(2), self.projector[slots], z)
        z = F.gelu(z)
        out = torch.baddbmm(self.up_bias[slots].unsqueeze(1), z.transpose(1, 2), self.up[slots].transpose(1, 2))
        return x + out.reshape(b, h, w, m)
