"""Synthetic adapters: trained-looking random weights for a backbone, for benchmarks and tests.

Offline there are no trained tasks to serve; these packages have the exact shapes, dtypes and
manifests of real ones, with values far from Mona's near-identity initialisation so no code path
is skipped by accident.
"""

from __future__ import annotations

import torch

from .compat import expected_shapes
from .manifest import BackboneRef, InputSpec, Manifest
from .package import AdapterPackage
from .swin import Backbone


def make_manifest(backbone: Backbone, name: str, num_labels: int = 5, version: int = 1, kind: str = "classify", **fields) -> Manifest:
    """A manifest of `kind` for `backbone` (input at the backbone's size unless `input` is given)."""
    fields.setdefault("input", InputSpec(size=backbone.input_size))
    return Manifest(
        name=name,
        version=version,
        kind=kind,
        labels=[f"{name}-class-{i}" for i in range(num_labels)],
        backbone=BackboneRef(name=backbone.name, fingerprint=backbone.fingerprint),
        **fields,
    )


def random_adapter_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Trained-looking adapter weights: no parameter at its initial value, gamma far from 1e-6."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=generator)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or leaf == "gammax":
            tensors[name] = 1.0 + 0.2 * noise
        elif leaf == "running_var":
            tensors[name] = 0.5 + 0.2 * noise.abs()
        elif leaf == "gamma":
            tensors[name] = 0.5 * noise
        else:
            tensors[name] = 0.1 * noise
    return tensors


def random_package(
    backbone: Backbone, name: str, seed: int, num_labels: int = 5, version: int = 1, kind: str = "classify", **fields
) -> AdapterPackage:
    """A complete, valid package with random weights for `backbone` (`fields` go to the manifest)."""
    manifest = make_manifest(backbone, name, num_labels=num_labels, version=version, kind=kind, **fields)
    tensors = random_adapter_tensors(expected_shapes(manifest, backbone), seed)
    return AdapterPackage(manifest=manifest, tensors=tensors)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter of `module` trained-looking random values, in place."""
    values = random_adapter_tensors({n: tuple(p.shape) for n, p in module.named_parameters()}, seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(values[n])
    return module
