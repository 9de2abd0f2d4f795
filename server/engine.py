"""The backbone engine: one frozen Swin on one device, K adapter slots, and mixed-task batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monaserve.adapters import (
    DENSE_RUN_LIMIT,
    INNER_DIM,
    AdapterPackage,
    Backbone,
    IncompatibleAdapterError,
    Manifest,
    MonaBank,
    SlotRouting,
    adapter_modules,
    build_head,
    check_compatible,
    fold_mona_state,
    forward_pyramid,
    inject_mona,
    load_head,
)
from monaserve.adapters.kinds import to_host
from monaserve.adapters.transforms import normalize, spec_norm


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    """Runs one shared backbone for every task; each sample of a batch names its task by slot id.

    Frozen layers run once for the whole batch; every Mona position is a `MonaBank` that applies each
    sample's own folded adapter; each task's head runs on its slice. The caller (the registry) decides
    which package sits in which slot and must not overwrite a slot that an in-flight batch uses.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_slots: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        inner_dim: int = INNER_DIM,
        dense_run_limit: int = DENSE_RUN_LIMIT,
    ) -> None:
        if num_slots < 1:
            raise ValueError("an engine needs at least one adapter slot")
        self.backbone = backbone
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.inner_dim = inner_dim
        inject_mona(backbone.model, lambda dim: MonaBank(dim, inner_dim, num_slots, dense_run_limit=dense_run_limit))
        self.model = backbone.model.to(self.device, self.dtype).eval()
        self.banks: dict[str, MonaBank] = adapter_modules(self.model)
        self.heads: list[nn.Module | None] = [None] * num_slots
        self.manifests: list[Manifest | None] = [None] * num_slots
        self.means = torch.zeros(num_slots, 3, 1, 1, device=self.device)  # each slot's input normalisation
        self.stds = torch.ones(num_slots, 3, 1, 1, device=self.device)

    @property
    def num_slots(self) -> int:
        return len(self.heads)

    @property
    def slot_nbytes(self) -> int:
        """Device bytes one slot of folded adapters takes across all Mona positions."""
        return sum(buf[0].numel() * buf.element_size() for bank in self.banks.values() for buf in bank.buffers())

    def head_nbytes(self, slot: int) -> int:
        head = self.heads[slot]
        return 0 if head is None else sum(p.numel() * p.element_size() for p in head.parameters())

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    def check(self, package: AdapterPackage) -> None:
        """Raise `IncompatibleAdapterError` unless `package` can be installed in this engine."""
        check_compatible(package, self.backbone)
        manifest = package.manifest
        if manifest.mona_inner_dim != self.inner_dim:
            raise IncompatibleAdapterError(
                f"adapter {manifest.name!r} uses Mona inner dim {manifest.mona_inner_dim}; this engine runs {self.inner_dim}"
            )

    def install(self, slot: int, package: AdapterPackage) -> None:
        """Fold `package` and place it in `slot`. Everything is prepared before the slot is touched."""
        self._check_slot(slot)
        self.check(package)
        manifest = package.manifest
        head = build_head(manifest, self.backbone.stage_dims)
        load_head(head, package.subset("head."))
        # check() has verified every tensor's name and shape, so the state dicts fold directly
        folded = {path: fold_mona_state(package.subset(f"{path}.")) for path in self.banks}
        for path, bank in self.banks.items():
            bank.write(slot, folded[path])
        self.heads[slot] = head.to(self.device, self.dtype).eval()
        mean, std = spec_norm(manifest.input, self.device)
        self.means[slot], self.stds[slot] = mean, std
        self.manifests[slot] = manifest

    @torch.inference_mode()
    def warmup(self, batch_size: int = 1) -> None:
        """Run the backbone once at its input size so first requests do not pay for lazy initialisation."""
        images = torch.zeros(batch_size, 3, *self.backbone.input_size, device=self.device, dtype=self.dtype)
        forward_pyramid(self.model, images, SlotRouting.of([0] * batch_size, self.device))

    def evict(self, slot: int) -> None:
        """Empty `slot`: its adapters become the identity and its head is dropped."""
        self._check_slot(slot)
        for bank in self.banks.values():
            bank.clear(slot)
        self.heads[slot] = None
        self.manifests[slot] = None

    @torch.inference_mode()
    def run(self, images: torch.Tensor, slots: Sequence[int] | torch.Tensor) -> list[HeadOutput]:
        """Run a mixed batch: `images` `(B, 3, H, W)`, uint8 as `preprocess` makes them (copied to the device
        as they are, then normalised there with each sample's own task's mean and std, in one pass) or
        float already normalised; `slots[i]` the slot of image i.

        Returns each image's head prediction on the CPU, in batch order, in the model input's pixels:
        classify probabilities (float32), detect `{boxes, scores, labels}`, or segment class ids `(H, W)`.
        """
        slot_ids = torch.as_tensor(slots, dtype=torch.long)
        if slot_ids.shape != (images.shape[0],):
            raise ValueError(f"need one slot per image: {images.shape[0]} images, slots of shape {tuple(slot_ids.shape)}")
        for slot in slot_ids.unique().tolist():
            self._check_slot(slot)
            if self.heads[slot] is None:
                raise LookupError(f"slot {slot} holds no adapter")
        # Sort by slot so each task is one contiguous run: dense adapter ops and head inputs are slices.
        order = torch.argsort(slot_ids, stable=True)
        routing = SlotRouting.of(slot_ids[order], self.device)
        order_on_device = order.to(self.device)
        if images.dtype == torch.uint8:
            on_device = slot_ids.to(self.device)[order_on_device]
            images = normalize(images.to(self.device)[order_on_device], self.means[on_device], self.stds[on_device], self.dtype)
        else:
            images = images.to(self.device, self.dtype)[order_on_device]
        features = forward_pyramid(self.model, images, routing)
        outputs: list[HeadOutput | None] = [None] * len(slot_ids)
        positions = order.tolist()
        for slot, start, stop in routing.runs:
            predictions = self.heads[slot].predict([level[start:stop] for level in features])
            for i, prediction in zip(positions[start:stop], predictions):
                outputs[i] = to_host(prediction)
        return outputs


HeadOutput = torch.Tensor | dict[str, torch.Tensor]
