"""The official Swin's window layout, as a reference for what timm's Swin (which the server runs) computes.

The official Swin backbones of the Mona code (github Leiyi-Hu/mona, `swin_transformer_mona.py`, as Microsoft's
Swin-Transformer-Object-Detection) pad each map to a multiple of the window, then roll it for a shifted block,
and shift every odd block, the last stage's included. timm rolls, then pads, and never shifts a stage whose map,
at the size the model was built for, fits in one window: the last stage of every Swin here (7 x 7 at 224).
`official_layout` patches a timm Swin to the official layout; `python -m monaserve.testing.window_layout`
prints how far timm's pyramid is from it at several input sizes (docs/training.md#input-sizes).
"""

from __future__ import annotations

import argparse
import types

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse

from monaserve.adapters.swin import create_swin, forward_pyramid


def shifted_window_mask(height: int, width: int, window: int, shift: int, like: torch.Tensor) -> torch.Tensor:
    """The shifted-window attention mask of a padded `height` x `width` map: 0 within a region, -100 across."""
    regions = torch.zeros(1, height, width, 1, dtype=like.dtype, device=like.device)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    for index, (h, w) in enumerate((h, w) for h in bounds for w in bounds):
        regions[:, h[0] : h[1], w[0] : w[1], :] = index
    windows = window_partition(regions, (window, window)).view(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def official_attention(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """`block`'s window attention on NHWC `x` as the official Swin computes it: pad, then roll by the block's
    own shift (the last stage's too), attend within windows, and undo both."""
    _, height, width, channels = x.shape
    window, shift = block.window_size[0], block.target_shift_size[0]
    x = F.pad(x, (0, 0, 0, (window - width % window) % window, 0, (window - height % window) % window))
    padded_height, padded_width = x.shape[1:3]
    mask = None
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = shifted_window_mask(padded_height, padded_width, window, shift, x)
    windows = window_partition(x, (window, window)).view(-1, window * window, channels)
    attended = block.attn(windows, mask=mask).view(-1, window, window, channels)
    x = window_reverse(attended, (window, window), padded_height, padded_width)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def official_layout(model: SwinTransformer) -> SwinTransformer:
    """`model` with every block's window attention in the official layout, in place."""
    for stage in model.layers:
        for block in stage.blocks:
            block._attn = types.MethodType(official_attention, block)
    return model


def level_differences(name: str, size: tuple[int, int], seed: int = 0, always_partition: bool = False) -> list[float]:
    """Relative difference of each pyramid level (four stages, then the normed last) between timm's layout (with
    its `always_partition` option) and the official one, for random weights and a random image of `size`."""
    timm_model = create_swin(name, seed=seed, strict_img_size=False, always_partition=always_partition)
    official = official_layout(create_swin(name, seed=seed, strict_img_size=False))
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = forward_pyramid(timm_model, images), forward_pyramid(official, images)
    return [((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--sizes", default="64,160,224,256,320,448,512", help="square input sides, comma-separated")
    args = parser.parse_args()
    print("| input | timm (served): stage 1 | 2 | 3 | 4 | timm always_partition: stage 1 | 2 | 3 | 4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in (int(s) for s in args.sizes.split(",")):
        served, partitioned = (level_differences(args.backbone, (side, side), always_partition=a)[:4] for a in (False, True))
        print(f"| {side} | " + " | ".join(f"{100 * d:.1f}%" for d in [*served, *partitioned]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
