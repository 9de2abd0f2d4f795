"""A fused Mona bank in Triton: the folded adapter of each sample's own slot in two passes over the activations.

Pass 1 (`_down_kernel`) reads x once: the down projection against `[A; B]` with the LayerNorm folded in
(per-token mean and mean square gathered on the way), writing the n-wide bottleneck z. Pass 2
(`_mix_up_kernel`) reads z's 7x7 neighbourhood and x once: the depthwise filter, the 1x1 with GELU and
the up projection with the residual, writing y. Each program handles one sample's block of tokens and
reads that sample's slot id, so a batch mixes tasks as the torch path (`MonaBank.forward`) does, with the
same arithmetic: float32 accumulation, the bottleneck rounded to x's dtype where the torch path rounds it.

On CUDA it runs compiled by Triton; elsewhere only under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_TOKENS = 32
BLOCK_CHANNELS = 32


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """`a @ b + acc` in float32; UPCAST: with float32 operands (the CPU interpreter's dot mishandles bf16)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _down_kernel(
    x_ptr, slots_ptr, down_ptr, down_sum_ptr, down_bias_ptr, z_ptr,
    tokens, dim, eps,
    INNER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    sample, block = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + sample)
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < tokens
    inner = tl.arange(0, INNER)
    x_rows = x_ptr + sample * tokens * dim + rows[:, None] * dim
    weights = down_ptr + slot * dim * 2 * INNER
    scaled = tl.zeros((BLOCK_T, INNER), dtype=tl.float32)
    direct = tl.zeros((BLOCK_T, INNER), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wide = x.to(tl.float32)
        total += tl.sum(wide, axis=1)
        squares += tl.sum(wide * wide, axis=1)
        w_rows = weights + ks[:, None] * 2 * INNER + inner[None, :]
        scaled = _dot(x, tl.load(w_rows, mask=k_ok[:, None], other=0.0), scaled, UPCAST, PRECISION)
        direct = _dot(x, tl.load(w_rows + INNER, mask=k_ok[:, None], other=0.0), direct, UPCAST, PRECISION)
    mean = total / dim
    inverse_deviation = 1.0 / tl.sqrt(tl.maximum(squares / dim - mean * mean, 0.0) + eps)
    down_sum = tl.load(down_sum_ptr + slot * INNER + inner).to(tl.float32)
    down_bias = tl.load(down_bias_ptr + slot * INNER + inner).to(tl.float32)
    z = (scaled - mean[:, None] * down_sum[None, :]) * inverse_deviation[:, None] + direct + down_bias[None, :]
    z_rows = z_ptr + sample * tokens * INNER + rows[:, None] * INNER + inner[None, :]
    tl.store(z_rows, z.to(z_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _mix_up_kernel(
    z_ptr, x_ptr, slots_ptr, depthwise_ptr, depthwise_bias_ptr, projector_ptr, projector_bias_ptr, up_ptr, up_bias_ptr, y_ptr,
    height, width, dim,
    INNER: tl.constexpr, KERNEL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    sample, block = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + sample)
    tokens = height * width
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < tokens
    row_y, row_x = rows // width, rows % width
    inner = tl.arange(0, INNER)
    z_sample = z_ptr + sample * tokens * INNER
    taps = depthwise_ptr + slot * INNER * KERNEL * KERNEL + inner * KERNEL * KERNEL
    filtered = tl.zeros((BLOCK_T, INNER), dtype=tl.float32)
    for tap in tl.static_range(KERNEL * KERNEL):
        near_y, near_x = row_y + tap // KERNEL - KERNEL // 2, row_x + tap % KERNEL - KERNEL // 2
        inside = row_ok & (near_y >= 0) & (near_y < height) & (near_x >= 0) & (near_x < width)
        near = tl.load(z_sample + (near_y * width + near_x)[:, None] * INNER + inner[None, :], mask=inside[:, None], other=0.0)
        filtered += near.to(tl.float32) * tl.load(taps + tap).to(tl.float32)[None, :]
    filtered += tl.load(depthwise_bias_ptr + slot * INNER + inner).to(tl.float32)[None, :]
    h = filtered.to(z_ptr.dtype.element_ty)
    projector = tl.load(projector_ptr + slot * INNER * INNER + inner[:, None] * INNER + inner[None, :])
    p = _dot(h, projector, tl.zeros((BLOCK_T, INNER), dtype=tl.float32), UPCAST, PRECISION)
    p += tl.load(projector_bias_ptr + slot * INNER + inner).to(tl.float32)[None, :]
    g = (0.5 * p * (1.0 + tl.erf(p * 0.7071067811865476))).to(z_ptr.dtype.element_ty)
    x_rows = x_ptr + sample * tokens * dim + rows[:, None] * dim
    y_rows = y_ptr + sample * tokens * dim + rows[:, None] * dim
    for start in range(0, dim, BLOCK_M):
        ms = start + tl.arange(0, BLOCK_M)
        m_ok = ms < dim
        up = tl.load(up_ptr + slot * INNER * dim + inner[:, None] * dim + ms[None, :], mask=m_ok[None, :], other=0.0)
        out = _dot(g, up, tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32), UPCAST, PRECISION)
        out += tl.load(up_bias_ptr + slot * dim + ms, mask=m_ok, other=0.0).to(tl.float32)[None, :]
        both = row_ok[:, None] & m_ok[None, :]
        x = tl.load(x_rows + ms[None, :], mask=both, other=0.0)
        tl.store(y_rows + ms[None, :], (x.to(tl.float32) + out).to(y_ptr.dtype.element_ty), mask=both)


@triton_op("monaserve::fused_mona", mutates_args=())
def fused_mona(
    x: torch.Tensor,
    slots: torch.Tensor,
    down: torch.Tensor,
    down_sum: torch.Tensor,
    down_bias: torch.Tensor,
    depthwise: torch.Tensor,
    depthwise_bias: torch.Tensor,
    projector: torch.Tensor,
    projector_bias: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """`MonaBank.forward` of NHWC `x` `(B, H, W, m)`, sample i through slot `slots[i]`, from the bank's
    stored tensors (each with a leading slot axis; see `MonaBank.slot_shapes`)."""
    b, h, w, m = x.shape
    n, kernel = depthwise.shape[1], depthwise.shape[-1]
    x = x.contiguous()
    z = torch.empty(b, h, w, n, device=x.device, dtype=x.dtype)
    y = torch.empty_like(x)
    upcast = x.device.type != "cuda"  # the interpreter
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    grid = (b, triton.cdiv(h * w, BLOCK_TOKENS))
    wrap_triton(_down_kernel)[grid](
        x, slots, down, down_sum, down_bias, z, h * w, m, eps,
        INNER=n, BLOCK_T=BLOCK_TOKENS, BLOCK_K=BLOCK_CHANNELS, UPCAST=upcast, PRECISION=precision,
    )  # fmt: skip
    wrap_triton(_mix_up_kernel)[grid](
        z, x, slots, depthwise, depthwise_bias, projector, projector_bias, up, up_bias, y, h, w, m,
        INNER=n, KERNEL=kernel, BLOCK_T=BLOCK_TOKENS, BLOCK_M=BLOCK_CHANNELS, UPCAST=upcast, PRECISION=precision,
    )  # fmt: skip
    return y
