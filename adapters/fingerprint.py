"""A stable fingerprint of a backbone's weights, so an adapter is only ever served on the weights it was trained on."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

PREFIX = "sha256:"


def fingerprint_module(module: nn.Module) -> str:
    """SHA-256 over the state dict in name order: each entry's name, dtype, shape and raw bytes.

    Device and memory layout do not change it; a different dtype does (bf16 weights are other weights).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(raw.numpy()))
    return PREFIX + digest.hexdigest()


def short(fingerprint: str) -> str:
    """The first 12 hex digits, for messages."""
    return fingerprint.removeprefix(PREFIX)[:12]
