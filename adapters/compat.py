"""Does an adapter package fit the backbone it is about to run on? Every mismatch is named."""

from __future__ import annotations

import torch

from .fingerprint import short
from .heads import head_tensors
from .kinds import build_head
from .manifest import Manifest
from .mona import Mona
from .package import AdapterPackage, IncompatibleAdapterError
from .swin import Backbone, block_dims

MAX_LISTED = 5


def mona_shapes(backbone: Backbone, inner_dim: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every Mona a task on `backbone` holds, for adapters of inner width `inner_dim`."""
    with torch.device("meta"):
        by_width = {dim: Mona(dim, inner_dim).state_dict() for dim in {dim for _, dim in block_dims(backbone.model)}}
    return {
        f"{path}.{position}.{name}": tuple(tensor.shape)
        for path, dim in block_dims(backbone.model)
        for position in ("mona1", "mona2")
        for name, tensor in by_width[dim].items()
    }


def expected_shapes(manifest: Manifest, backbone: Backbone) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a package with `manifest` must hold for `backbone`: its Monas and its head."""
    with torch.device("meta"):
        head = build_head(manifest, backbone.stage_dims)
    shapes = mona_shapes(backbone, manifest.mona_inner_dim)
    shapes.update({f"head.{name}": tuple(tensor.shape) for name, tensor in head_tensors(head).items()})
    return shapes


def listing(names: list[str]) -> str:
    """The first names of a list, and how many more, for an error message."""
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_compatible(package: AdapterPackage, backbone: Backbone) -> None:
    """Raise `IncompatibleAdapterError` unless `package` was made for exactly this backbone and layout."""
    manifest = package.manifest
    who = f"adapter {manifest.name!r} v{manifest.version}"
    if manifest.backbone.name.split(".", 1)[0] != backbone.name:
        raise IncompatibleAdapterError(f"{who} was trained on backbone {manifest.backbone.name!r}; this server runs {backbone.name!r}")
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise IncompatibleAdapterError(
            f"{who} was trained on other weights of {backbone.name}: its backbone fingerprint is "
            f"{short(manifest.backbone.fingerprint)}, this server's is {short(backbone.fingerprint)}"
        )
    expected = expected_shapes(manifest, backbone)
    problems = []
    missing = sorted(expected.keys() - package.tensors.keys())
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    unexpected = sorted(package.tensors.keys() - expected.keys())
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected)}")
    wrong = sorted(
        f"{name} is {tuple(package.tensors[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if name in package.tensors and tuple(package.tensors[name].shape) != shape
    )
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong)}")
    if problems:
        raise IncompatibleAdapterError(f"{who} does not fit {backbone.name}: " + "; ".join(problems))
