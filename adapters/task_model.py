"""One task's trainable model: the frozen backbone with reference Mona adapters and the task's head."""

from __future__ import annotations

import torch
from torch import nn

from .compat import check_compatible
from .heads import head_tensors, load_head
from .kinds import build_head
from .manifest import Manifest
from .mona import Mona
from .package import AdapterPackage
from .swin import Backbone, forward_pyramid, inject_mona
from .transforms import normalize, spec_norm


class MonaTaskModel(nn.Module):
    """Backbone (frozen) + Mona after every attention and MLP residual + head; only adapters and head train.

    Takes ownership of `backbone.model`: the adapters are injected into it in place.
    """

    def __init__(self, backbone: Backbone, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest
        self.backbone_info = backbone
        backbone.model.requires_grad_(False)
        inject_mona(backbone.model, lambda dim: Mona(dim, manifest.mona_inner_dim))
        self.backbone = backbone.model
        self.head = build_head(manifest, backbone.stage_dims)
        mean, std = spec_norm(manifest.input)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid of `images`: uint8 as `preprocess` makes them (normalised here, as the engine does),
        or float already normalised."""
        if images.dtype == torch.uint8:
            images = normalize(images, self.mean, self.std)
        return forward_pyramid(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def loss(self, images: torch.Tensor, targets) -> torch.Tensor:
        """The head's training loss (class indices, detection targets or masks, in input pixels)."""
        return self.head.loss(self.features(images), targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list:
        """One prediction per image, as the server's engine gives them."""
        return self.head.predict(self.features(images))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What a package holds, under package names: the Mona adapters and the head."""
        tensors = {name: p for name, p in self.backbone.named_parameters() if ".mona" in name}
        tensors.update({f"head.{name}": t for name, t in head_tensors(self.head).items()})
        return tensors

    @torch.no_grad()
    def load_mona(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set every Mona from `tensors` (package names, `layers.0.blocks.0.mona1.gamma`, ...); all of them, no others."""
        params = {name: p for name, p in self.backbone.named_parameters() if ".mona" in name}
        if tensors.keys() != params.keys():
            missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
            raise ValueError(f"Mona tensors do not match this backbone: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, tensor in tensors.items():
            params[name].copy_(tensor)

    def freeze_mona(self) -> None:
        """Stop every Mona from training, so that only what else trains (the head) learns on the adapters as they are."""
        for name, parameter in self.backbone.named_parameters():
            if ".mona" in name:
                parameter.requires_grad_(False)

    def to_package(self, manifest: Manifest | None = None) -> AdapterPackage:
        """Package the current adapter and head weights (float32) under `manifest` (default: the model's)."""
        tensors = {name: t.detach().float().cpu().clone() for name, t in self.adapter_tensors().items()}
        return AdapterPackage(manifest=manifest or self.manifest, tensors=tensors)

    @torch.no_grad()
    def load_package(self, package: AdapterPackage) -> None:
        """Load a package's weights after checking that it fits this model's backbone."""
        check_compatible(package, self.backbone_info)
        self.load_mona({name: t for name, t in package.tensors.items() if not name.startswith("head.")})
        load_head(self.head, package.subset("head."))
