"""The backbone engine: one frozen Swin on one device, K adapter slots, and mixed-task batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from monaserve.adapters import (
    INNER_DIM,
    AdapterPackage,
    Backbone,
    IncompatibleAdapterError,
    Manifest,
    MonaBank,
    MonaKernel,
    SlotMapping,
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

from .compile import batch_buckets, bucket_of, compile_forward

log = logging.getLogger("monaserve.engine")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    """Runs one shared backbone for every task; each sample of a batch names its task by slot id.

    Frozen layers run once for the whole batch; every Mona position is a `MonaBank` that applies each
    sample's own folded adapter, read from one `SlotMapping` set per batch; each task's head runs on its
    slice. With `compile`, batches are padded to a bucket (1, 2, 4, ..., `max_batch`), so the batched
    forward sees a few shapes per input size and nothing else: one graph each. The caller (the registry)
    decides which package sits in which slot and must not overwrite a slot that an in-flight batch uses.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_slots: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        inner_dim: int = INNER_DIM,
        max_batch: int = 64,
        compile: bool = False,
        mona_kernel: MonaKernel = "torch",
    ) -> None:
        if num_slots < 1:
            raise ValueError("an engine needs at least one adapter slot")
        self.backbone = backbone
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.inner_dim = inner_dim
        self.buckets = batch_buckets(max_batch)
        self.mapping = SlotMapping(max_batch, self.device)
        inject_mona(backbone.model, lambda dim: MonaBank(dim, inner_dim, num_slots, self.mapping, kernel=mona_kernel))
        self.model = backbone.model.to(self.device, self.dtype).eval()
        self.banks: dict[str, MonaBank] = adapter_modules(self.model)
        self.heads: list[nn.Module | None] = [None] * num_slots
        self.manifests: list[Manifest | None] = [None] * num_slots
        self.means = torch.zeros(num_slots, 3, 1, 1, device=self.device)  # each slot's input normalisation
        self.stds = torch.ones(num_slots, 3, 1, 1, device=self.device)
        self.compiled = compile
        self._features: Callable[[torch.Tensor], list[torch.Tensor]] = (
            compile_forward(self._batch_features, self.device, len(self.buckets)) if compile else self._batch_features
        )
        self._prepared: set[tuple[int, int]] = set()

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
    def prepare(self, size: tuple[int, int] | None = None) -> None:
        """Run every bucket once at input `size` (default the backbone's), so that no request pays for lazy
        initialisation or, compiled, for a compile; on the engine's own thread, as batches run."""
        size = tuple(size or self.backbone.input_size)
        if size in self._prepared:
            return
        for bucket in self.buckets if self.compiled else self.buckets[:1]:
            if self.compiled:
                log.info("compiling the batched forward for %d images of %dx%d", bucket, *size)
            self.features(torch.zeros(bucket, 3, *size, dtype=torch.uint8, device=self.device), [0] * bucket)
        self._prepared.add(size)

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
        count = images.shape[0]
        if slot_ids.shape != (count,):
            raise ValueError(f"need one slot per image: {count} images, slots of shape {tuple(slot_ids.shape)}")
        if count > self.buckets[-1]:
            raise ValueError(f"a batch of {count} images; this engine runs at most {self.buckets[-1]}")
        for slot in slot_ids.unique().tolist():
            self._check_slot(slot)
            if self.heads[slot] is None:
                raise LookupError(f"slot {slot} holds no adapter")
        # Sorted by slot, each task's samples are one contiguous run: its head's inputs are slices.
        order = torch.argsort(slot_ids, stable=True)
        sorted_slots = slot_ids[order]
        # Compiled, a batch is padded to its bucket (with its last slot, so it stays sorted): a graph per bucket.
        # Eager, padding would only add work.
        padding = bucket_of(count, self.buckets) - count if self.compiled else 0
        images = images[order]
        if padding:
            images = torch.cat([images, images.new_zeros(padding, *images.shape[1:])])
        features = self.features(images.to(self.device, non_blocking=True), torch.cat([sorted_slots, sorted_slots[-1:].expand(padding)]))
        outputs: list[HeadOutput | None] = [None] * count
        positions = order.tolist()
        values, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
        start = 0
        for slot, run in zip(values.tolist(), counts.tolist()):
            stop = start + run
            predictions = self.heads[slot].predict([level[start:stop] for level in features])
            for i, prediction in zip(positions[start:stop], predictions):
                outputs[i] = to_host(prediction)
            start = stop
        return outputs

    def features(self, images: torch.Tensor, slots: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The backbone's NHWC pyramid of a batch on the device whose size is a bucket, image i through slot
        `slots[i]`: the mapping is set, then the batched forward runs (compiled, with `compile`)."""
        self.mapping.set(slots)
        return self._features(images.contiguous())  # one layout: a compiled graph guards on strides too

    def _batch_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's NHWC pyramid of a padded, routed batch on the device: the part every task shares,
        and the part `compile` compiles (nothing in it depends on the task mix)."""
        if images.dtype == torch.uint8:
            slots = self.mapping.current(images.shape[0])
            images = normalize(images, self.means[slots], self.stds[slots], self.dtype)
        else:
            images = images.to(self.dtype)
        return forward_pyramid(self.model, images)


HeadOutput = torch.Tensor | dict[str, torch.Tensor]
