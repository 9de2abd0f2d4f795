"""A bank of folded Mona adapters for one position in the backbone: K task slots, chosen per sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .mona import FOLDED_KERNEL, FoldedMona

MonaKernel = Literal["torch", "triton"]
"""How a bank computes: torch ops, or the fused Triton kernels."""


def bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (batched) returned in float32: reduced-precision inputs keep the float32 accumulation
    (on CUDA without an extra pass over the output; elsewhere reduced precision is for tests, and computes in float32)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


class SlotMapping:
    """Which adapter slot each sample of the running batch uses: a device tensor written once per batch.

    Every `MonaBank` of a model reads the one mapping it was built with, as vLLM's LoRA layers read
    their punica wrapper's metadata, so the backbone keeps timm's forward signature and a compiled
    graph never depends on the task mix: a new batch changes the tensor's contents, never its shape or
    address (which CUDA graphs replay from). A bank reads the first B entries for a batch of B.
    """

    def __init__(self, max_batch: int, device: torch.device | str = "cpu") -> None:
        if max_batch < 1:
            raise ValueError("a slot mapping needs room for at least one sample")
        self.sample_slots = torch.zeros(max_batch, dtype=torch.long, device=device)

    @property
    def max_batch(self) -> int:
        return self.sample_slots.numel()

    def set(self, slots: Sequence[int] | torch.Tensor) -> None:
        """Route the next batch: sample i through slot `slots[i]`."""
        ids = torch.as_tensor(slots, dtype=torch.long).flatten()
        if not 0 < ids.numel() <= self.max_batch:
            raise ValueError(f"a batch of {ids.numel()} samples; this mapping routes 1 to {self.max_batch}")
        self.sample_slots[: ids.numel()].copy_(ids, non_blocking=True)

    def current(self, batch_size: int) -> torch.Tensor:
        """The slots of the batch now running, `(batch_size,)`."""
        return self.sample_slots[:batch_size]


class MonaBank(nn.Module):
    """K folded Mona adapters of width `dim`; each sample of a batch goes through its own slot.

    Slots live in non-persistent buffers (stacked along a leading slot axis) so they follow the
    module's device and dtype but never enter the backbone's state dict. An empty slot is all zeros,
    which makes it the identity.

    `kernel` "triton" runs the same function as two fused Triton kernels (`mona_kernel.fused_mona`; CUDA,
    or the CPU interpreter in tests); "torch" runs it as torch ops.

    One path for every task mix, so that its graph is the same for every batch of a shape: each
    sample's weights are gathered by its slot id and the projections are batched matmuls. The
    LayerNorm is folded into the down projection: with mean mu and inverse deviation r of a token x,
    A @ LN(x) + B @ x = r * (A @ x - mu * A @ 1) + B @ x, so one matmul against [A; B] takes the place
    of the LayerNorm and two matmuls.
    """

    def __init__(
        self, dim: int, inner_dim: int, num_slots: int, mapping: SlotMapping, eps: float = 1e-5, kernel: MonaKernel = "torch"
    ) -> None:
        super().__init__()
        self.dim, self.inner_dim, self.num_slots, self.eps = dim, inner_dim, num_slots, eps
        self.mapping, self.kernel = mapping, kernel
        if kernel == "triton":  # imported here, not on the hot path: Triton is only needed where it runs
            from .mona_kernel import fused_mona

            self._fused = fused_mona
        for name, shape in self.slot_shapes(dim, inner_dim).items():
            self.register_buffer(name, torch.zeros(num_slots, *shape), persistent=False)

    @staticmethod
    def slot_shapes(dim: int, inner_dim: int) -> dict[str, tuple[int, ...]]:
        """Shape of each stored field for one slot: `FoldedMona`'s, the two down projections stacked."""
        m, n, k = dim, inner_dim, FOLDED_KERNEL
        return {
            "down": (m, 2 * n),  # [A; B] transposed: (x @ down)[:, :n] = A @ x, [:, n:] = B @ x
            "scaled_down_sum": (n,),  # A @ 1, for the mean's share of A @ LN(x)
            "down_bias": (n,),
            "depthwise": (n, k, k),
            "depthwise_bias": (n,),
            "projector": (n, n),  # transposed
            "projector_bias": (n,),
            "up": (n, m),  # transposed
            "up_bias": (m,),
        }

    @torch.no_grad()
    def write(self, slot: int, folded: FoldedMona) -> None:
        """Place one task's folded adapter in `slot`."""
        stored = {
            "down": torch.cat([folded.scaled_down, folded.direct_down]).T,
            "scaled_down_sum": folded.scaled_down.sum(1),
            "down_bias": folded.down_bias,
            "depthwise": folded.depthwise,
            "depthwise_bias": folded.depthwise_bias,
            "projector": folded.projector.T,
            "projector_bias": folded.projector_bias,
            "up": folded.up.T,
            "up_bias": folded.up_bias,
        }
        for name, value in stored.items():
            getattr(self, name)[slot].copy_(value)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Reset `slot` to the identity."""
        for buffer in self.buffers():
            buffer[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt NHWC `x` `(B, H, W, dim)`, sample i through slot `mapping.current(B)[i]`."""
        b, h, w, m = x.shape
        n, k = self.inner_dim, FOLDED_KERNEL
        slots = self.mapping.current(b)
        if self.kernel == "triton":
            return self._fused(x, slots, *(getattr(self, name) for name in self.slot_shapes(m, n)), self.eps)
        tokens = x.reshape(b, h * w, m)
        # In float32: the mean's correction cancels most of A @ x where |mu| >> 1 / r, as does E[x^2] - mu^2
        # (two plain sums, several times faster on the CPU than torch.var_mean's one-pass Welford).
        mean = tokens.mean(-1, keepdim=True, dtype=torch.float32)
        variance = (tokens.float().square().mean(-1, keepdim=True) - mean.square()).clamp_min(0)
        inverse_deviation = torch.rsqrt(variance + self.eps)
        both = bmm_float32(tokens, self.down[slots])
        scaled, direct = both[..., :n], both[..., n:]
        z = (scaled - mean * self.scaled_down_sum[slots].float().unsqueeze(1)) * inverse_deviation + direct
        z = (z + self.down_bias[slots].float().unsqueeze(1)).to(x.dtype)
        # Fold the batch into the channel axis, channels-last, so one conv with groups=B*n covers every sample.
        z = z.view(b, h, w, n).permute(1, 2, 0, 3).reshape(1, h, w, b * n).permute(0, 3, 1, 2)
        kernel = self.depthwise[slots].reshape(b * n, 1, k, k)
        z = F.conv2d(z, kernel, self.depthwise_bias[slots].reshape(b * n), padding=k // 2, groups=b * n)
        z = z.permute(0, 2, 3, 1).reshape(h * w, b, n).transpose(0, 1)
        z = F.gelu(torch.baddbmm(self.projector_bias[slots].unsqueeze(1), z, self.projector[slots]))
        out = torch.baddbmm(self.up_bias[slots].unsqueeze(1), z, self.up[slots])
        return x + out.view(b, h, w, m)
