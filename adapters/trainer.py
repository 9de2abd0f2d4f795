"""Mona tuning: freeze the backbone, train Mona + head, evaluate, and write an adapter package."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .baselines import METHODS, get_method
from .config_args import REQUIRED, option
from .data.datasets import TaskDataset, collate
from .data.formats import FORMATS
from .evaluate import evaluate
from .import_mona import load_mona_init
from .kinds import Recipe, get_kind
from .manifest import BackboneRef, InputSpec, KindName, Manifest
from .package import AdapterPackage, atomic_write
from .swin import Backbone, BackboneOptions, resolve_device
from .task_model import MonaTaskModel

DataFormatName = Literal[("auto", *FORMATS)]
"""`auto` or a format's name (`data.formats.FORMATS`), which `--data-format` offers."""

Method = Literal[tuple(METHODS)]
"""The training methods' names (`baselines.METHODS`), which `--baseline` offers."""


@dataclass
class TrainConfig(BackboneOptions):
    """Everything `monaserve train` takes: each field's default and help are the command line's."""

    kind: KindName = option(REQUIRED, "the kind of task", positional=True)
    data: Path = option(REQUIRED, "ImageFolder root (classify), COCO json (detect), images folder (segment)", positional=True)
    name: str = option(REQUIRED, "task name")
    baseline: Method = option(
        "mona", f"what trains: mona, or a baseline of the Mona paper ({', '.join(list(METHODS)[1:])}); see docs/training.md#baselines"
    )
    masks: Path | None = option(None, "segment: folder of PNG class-id masks named like the images")
    images: Path | None = option(None, "detect: images folder (default: images/ beside the json)")
    data_format: DataFormatName = option("auto", "the dataset's format (docs/training.md#what-it-does): auto, the one its layout matches")
    mona_init: Path | None = option(None, "start Mona from this file: an official Mona checkpoint, an import-mona output or a package")
    freeze_mona: bool = option(False, "keep Mona as it starts (with --mona-init: train only the head on imported adapters)")
    version: int = option(1, "the package's version")
    out: Path | None = option(None, "package path (default: NAME-VERSION.safetensors)")
    input_size: int = option(224, "square input side (multiple of 32)")
    resize: Literal["resize", "letterbox"] = option("resize", "how images are fitted to the input size")
    head_channels: int = option(256, "FPN (detect) or UperNet (segment) width")
    epochs: int = option(10, "passes over the training split")
    batch_size: int = option(16, "images per step")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float | None = option(None, "AdamW weight decay, never on norm layers (default: the kind's official recipe)")
    decay_biases: bool | None = option(None, "weight decay on biases too (default: the kind's official recipe; classify: off)")
    drop_path: float | None = option(None, "stochastic depth of the frozen backbone's blocks while training (default: the kind's recipe)")
    clip_grad_norm: float = option(10.0, "gradient norm clip; 0 clips nothing (as the official VOC and ADE20K runs)")
    warmup_steps: int = option(20, "linear warm-up before the cosine decay")
    val_fraction: float = option(0.2, "held out for the final evaluation")
    workers: int = option(2, "data loader processes")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    checkpoint_dir: Path | None = option(None, "checkpoint every epoch here")
    resume: bool = option(False, "continue from the checkpoint in --checkpoint-dir")
    max_steps: int | None = option(None, "stop after this many steps")
    progress: bool = option(True, "a progress bar over the training steps")

    def package_path(self) -> Path:
        return self.out or Path(f"{self.name}-{self.version}.safetensors")

    def with_recipe(self, recipe: Recipe) -> TrainConfig:
        """This config with every setting it leaves out (None) taken from `recipe`, the kind's official one."""
        return replace(self, **{name: value for name, value in asdict(recipe).items() if getattr(self, name) is None})


@dataclass
class TrainResult:
    package: AdapterPackage | None  # None for a baseline that changes the backbone
    path: Path  # the package, or that baseline's JSON report
    evaluation: dict[str, float]
    untrained: dict[str, float]
    losses: list[float] = field(default_factory=list)


NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
"""Layers whose weights and biases AdamW never decays (the official configs' `norm` key and mmcls's `norm_decay_mult=0`)."""

NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
"""Parameters AdamW never decays wherever they train (the official configs' keys of the same names)."""


def parameter_groups(model: nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """AdamW's parameter groups: the trainable parameters that decay, and those that do not (norm layers' weights
    and biases, which Mona's own LayerNorm is, Swin's position tables, and every bias unless `decay_biases`);
    empty groups left out."""
    decay, exempt = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad:
                kept = isinstance(module, NORM_LAYERS) or name in NO_DECAY_NAMES or (name == "bias" and not decay_biases)
                (exempt if kept else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the base rate over `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _to(targets, device: torch.device):
    if isinstance(targets, list):
        return [{k: v.to(device) for k, v in t.items()} for t in targets]
    return targets.to(device)


def checkpoint_tensors(model: MonaTaskModel) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the package's tensors, and whatever else trains (a baseline's
    backbone weights or modules of its own), so that a resumed run of any method goes on from where it stopped."""
    tensors = model.adapter_tensors()
    others = {name: p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("head.") and ".mona" not in name}
    tensors.update(others)  # named `backbone.…`, apart from the package's names
    return tensors


def save_checkpoint(path: Path, model: MonaTaskModel, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
    """Trained weights and AdamW state in one safetensors file (no pickle); counters in its metadata."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in checkpoint_tensors(model).items()}
    state = optimizer.state_dict()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    metadata = {"epoch": str(epoch), "step": str(step), "param_groups": json.dumps(state["param_groups"])}
    atomic_write(path, safetensors.torch.save(tensors, metadata=metadata))


def load_checkpoint(path: Path, model: MonaTaskModel, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore what `save_checkpoint` wrote; returns (next epoch, step)."""
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for name, target in checkpoint_tensors(model).items():
            target.copy_(tensors[f"model.{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["epoch"]) + 1, int(metadata["step"])


def train(config: TrainConfig, log: Callable[[str], None] = print, on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train Mona + head on `config.data`, evaluate on the held-out split, and write the package; `on_step`
    hears (steps done, steps in all) after every step (and may raise to stop the training)."""
    started = time.monotonic()
    method = get_method(config.baseline)
    if config.mona_init and not method.trains_mona:
        raise ValueError(f"--mona-init starts Mona, which --baseline {method.name} does not use: train it with --baseline mona")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)  # flips in the data pipeline
    kind = get_kind(config.kind)
    config = config.with_recipe(kind.recipe)
    data = kind.read_data(config.data, masks=config.masks, images=config.images, data_format=config.data_format)
    for note in data.notes:
        log(note)
    train_samples, val_samples = data.split(config.val_fraction, config.seed)
    backbone = Backbone.load(config.backbone, config.weights, config.seed, drop_path_rate=config.drop_path)
    initial_mona = load_mona_init(config.mona_init, backbone) if config.mona_init else None
    spec = InputSpec(size=(config.input_size, config.input_size), resize=config.resize)
    manifest = Manifest(
        name=config.name,
        version=config.version,
        kind=config.kind,
        labels=data.labels,
        backbone=BackboneRef(name=backbone.name, fingerprint=backbone.fingerprint),
        input=spec,
        head=kind.default_head(config.head_channels),
    )
    model = MonaTaskModel(backbone, manifest).to(device)
    if initial_mona is not None:
        model.load_mona(initial_mona)
        log(f"Mona starts from {config.mona_init} ({len(initial_mona)} tensors)")
    method.prepare(model)
    if config.freeze_mona:
        model.freeze_mona()
    counts = method.trainable_counts(model)
    trainable = sum(counts.values())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log(
        f"{config.kind} task {config.name!r} ({config.baseline}): {len(train_samples)} train / {len(val_samples)} "
        f"val images, {len(data.labels)} classes, device {device}"
    )
    parts = " + ".join(f"{part} {n:,}" for part, n in counts.items() if n)
    log(f"parameters: trainable {trainable:,} ({parts}), frozen {frozen:,}")
    exempt = "norms and biases" if not config.decay_biases else "norms"
    log(f"AdamW weight decay {config.weight_decay} (none on {exempt}), backbone drop_path {config.drop_path}")

    loader_args = {
        "batch_size": config.batch_size,
        "collate_fn": collate,
        "num_workers": config.workers,
        "persistent_workers": config.workers > 0,
    }
    train_loader = DataLoader(
        TaskDataset(kind, train_samples, spec, augment=True), shuffle=True, drop_last=len(train_samples) > config.batch_size, **loader_args
    )
    val_loader = DataLoader(TaskDataset(kind, val_samples, spec), **loader_args)
    total_steps = config.epochs * len(train_loader)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay, config.decay_biases), lr=config.lr)
    schedule = warmup_cosine(config.warmup_steps, total_steps)
    untrained = evaluate(model, val_loader, device)
    log(f"untrained: {json.dumps({k: round(v, 4) for k, v in untrained.items()})}")

    checkpoint = config.checkpoint_dir / "last.safetensors" if config.checkpoint_dir else None
    first_epoch, step = 0, 0
    if config.resume and checkpoint is not None and checkpoint.exists():
        first_epoch, step = load_checkpoint(checkpoint, model, optimizer)
        log(f"resumed from {checkpoint} at epoch {first_epoch}, step {step}")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    losses: list[float] = []
    model.train()
    with tqdm(total=total_steps, initial=step, desc=config.name, unit="step", disable=not config.progress, leave=False) as bar:
        for epoch in range(first_epoch, config.epochs):
            if step >= total_steps:
                break
            epoch_start, seen, epoch_losses = time.monotonic(), 0, []
            for images, targets in train_loader:
                with autocast:
                    loss = model.loss(images.to(device), _to(targets, device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable_params, config.clip_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * schedule(step)
                optimizer.step()
                step += 1
                seen += len(images)
                epoch_losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", img_s=f"{seen / (time.monotonic() - epoch_start):.1f}")
                if on_step is not None:
                    on_step(step, total_steps)
                if step >= total_steps:
                    break
            losses += epoch_losses
            log(
                f"epoch {epoch + 1} (step {step}/{total_steps}): loss {sum(epoch_losses) / max(1, len(epoch_losses)):.4f}, "
                f"{seen / (time.monotonic() - epoch_start):.1f} img/s"
            )
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, optimizer, epoch, step)

    evaluation = evaluate(model, val_loader, device)
    log(f"trained: {json.dumps({k: round(v, 4) for k, v in evaluation.items()})}")
    summary = {
        "method": config.baseline,
        "steps": step,
        "epochs": config.epochs,
        "train_images": len(train_samples),
        "val_images": len(val_samples),
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "evaluation": evaluation,
        "untrained_evaluation": untrained,
        "seconds": round(time.monotonic() - started, 1),
    }
    if not method.servable:  # the backbone changed: no package can ride on the shared one
        path = config.package_path().with_suffix(".json")
        atomic_write(path, json.dumps(summary, indent=2).encode())
        log(f"wrote {path} ({method.name} changes the backbone, so it is a report, not a servable package)")
        return TrainResult(None, path, evaluation, untrained, losses)
    head = kind.tune_head(manifest.head, evaluation)
    if head != manifest.head:
        tuned = {k: v for k, v in head.model_dump().items() if manifest.head.model_dump()[k] != v}
        log(f"picked on the validation data: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in tuned.items()})}")
    package = model.to_package(manifest.model_copy(update={"training": summary, "head": head}))
    path = package.save(config.package_path())
    log(f"wrote {path}")
    return TrainResult(package, path, evaluation, untrained, losses)
