"""A bank of folded Mona adapters for one position in the backbone: K task slots, chosen per sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .mona import FOLDED_KERNEL, FoldedMona

DENSE_RUN_LIMIT = 8
"""Default for `MonaBank.dense_run_limit`: up to this many slot runs per batch run as dense slices."""


class SlotRun(NamedTuple):
    """Samples `start:stop` of a batch all use adapter slot `slot`."""

    slot: int
    start: int
    stop: int


@dataclass(frozen=True)
class SlotRouting:
    """Each sample's adapter slot, and the runs of consecutive samples that share one.

    Built once per batch and passed to every `MonaBank`. When the caller sorts its batch by slot (the
    engine does), each task is one run and its samples are a contiguous slice of every activation.
    """

    slots: torch.Tensor
    runs: tuple[SlotRun, ...]

    @classmethod
    def of(cls, slots: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> SlotRouting:
        ids = torch.as_tensor(slots, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("a routing needs at least one sample")
        values, counts = torch.unique_consecutive(ids.cpu(), return_counts=True)
        stops = counts.cumsum(0).tolist()
        starts = [0, *stops[:-1]]
        runs = tuple(SlotRun(slot, start, stop) for slot, start, stop in zip(values.tolist(), starts, stops))
        return cls(slots=ids.to(device), runs=runs)

    def __len__(self) -> int:
        return self.slots.numel()


class MonaBank(nn.Module):
    """K folded Mona adapters of width `dim`; each sample of a batch goes through its own slot.

    Slots live in non-persistent buffers (stacked along a leading slot axis) so they follow the
    module's device and dtype but never enter the backbone's state dict. An empty slot is all zeros,
    which makes it the identity.

    Two ways to run a batch, the same function: a batch of at most `dense_run_limit` slot runs goes
    through plain dense ops on each run's slice (no weight copies, the depthwise conv in channels-last
    on a view); a batch of more runs gathers each sample's weights and uses batched matmuls.
    """

    def __init__(self, dim: int, inner_dim: int, num_slots: int, eps: float = 1e-5, dense_run_limit: int = DENSE_RUN_LIMIT) -> None:
        super().__init__()
        self.dim, self.inner_dim, self.num_slots, self.eps = dim, inner_dim, num_slots, eps
        self.dense_run_limit = dense_run_limit
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

    def forward(self, x: torch.Tensor, routing: SlotRouting | None = None) -> torch.Tensor:
        """Adapt NHWC `x` `(B, H, W, dim)`, sample i through slot `routing.slots[i]`."""
        if routing is None:
            raise ValueError("MonaBank needs a SlotRouting: one slot id per sample")
        if len(routing.runs) > self.dense_run_limit:
            return self._per_sample(x, routing.slots)
        if len(routing.runs) == 1:
            return self._dense(x, routing.runs[0].slot)
        out = torch.empty_like(x)
        for slot, start, stop in routing.runs:
            self._dense(x[start:stop], slot, out=out[start:stop])
        return out

    def _dense(self, x: torch.Tensor, slot: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every sample of `x` through `slot`: linear layers on NHWC, the depthwise conv on its channels-last view."""
        z = F.linear(F.layer_norm(x, (self.dim,), eps=self.eps), self.scaled_down[slot], self.down_bias[slot])
        z = z + F.linear(x, self.direct_down[slot])
        kernel = self.depthwise[slot].unsqueeze(1)
        z = F.conv2d(z.permute(0, 3, 1, 2), kernel, self.depthwise_bias[slot], padding=FOLDED_KERNEL // 2, groups=self.inner_dim)
        z = F.gelu(F.linear(z.permute(0, 2, 3, 1), self.projector[slot], self.projector_bias[slot]))
        return torch.add(x, F.linear(z, self.up[slot], self.up_bias[slot]), out=out)

    def _per_sample(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Sample i through `slots[i]`: gathered weights, batched matmuls, and one grouped conv for the batch."""
        b, h, w, m = x.shape
        n, k = self.inner_dim, FOLDED_KERNEL
        tokens = x.reshape(b, h * w, m)
        normed = F.layer_norm(tokens, (m,), eps=self.eps)
        z = torch.baddbmm(self.down_bias[slots].unsqueeze(1), normed, self.scaled_down[slots].transpose(1, 2))
        z = torch.baddbmm(z, tokens, self.direct_down[slots].transpose(1, 2))
        # Fold the batch into the channel axis, channels-last, so one conv with groups=B*n covers every sample.
        z = z.view(b, h, w, n).permute(1, 2, 0, 3).reshape(1, h, w, b * n).permute(0, 3, 1, 2)
        kernel = self.depthwise[slots].reshape(b * n, 1, k, k)
        z = F.conv2d(z, kernel, self.depthwise_bias[slots].reshape(b * n), padding=k // 2, groups=b * n)
        z = z.permute(0, 2, 3, 1).reshape(h * w, b, n).transpose(0, 1)
        z = F.gelu(torch.baddbmm(self.projector_bias[slots].unsqueeze(1), z, self.projector[slots].transpose(1, 2)))
        out = torch.baddbmm(self.up_bias[slots].unsqueeze(1), z, self.up[slots].transpose(1, 2))
        return x + out.view(b, h, w, m)
