"""timm Swin backbones: creation from the hub, a local file or a seed, and Mona injection into every block."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from .config_args import option
from .fingerprint import fingerprint_module

SUPPORTED_BACKBONES = (
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "swin_large_patch4_window7_224",
    "swin_base_patch4_window12_384",
    "swin_large_patch4_window12_384",
)
"""timm architectures (optionally with a `.tag` naming pretrained weights) that Mona is injected into."""

DEFAULT_BACKBONE = SUPPORTED_BACKBONES[0]
HUB = "hub"
RANDOM = "random"

PREFERRED_TAGS = ("ms_in22k",)
"""Pretrained tags `--weights hub` picks for an untagged backbone, the first timm has: ImageNet-22k, as the Mona paper tunes."""

HUB_FILENAME = "model.safetensors"
"""The weights file of a timm hub repository whose pretrained config names none (timm prefers it to `pytorch_model.bin`)."""

HUB_TIMEOUT_S = 5.0
"""Seconds the hub has to answer the one look-up for weights the cache lacks (huggingface_hub's retries take a minute)."""

OFFLINE_FIX = "start with --random-init (random weights, offline) or --weights FILE (a local .safetensors/.pth)"

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BackboneOptions:
    """The backbone options every command shares (`info`, `train`, `serve`), written once."""

    backbone: str = option(DEFAULT_BACKBONE, "timm Swin name, optionally with a pretrained tag (.ms_in1k, .ms_in22k, ...)")
    weights: str = option(
        HUB,
        "'hub' (timm's weights from the Hugging Face cache or hub: the --backbone tag, else ImageNet-22k), "
        "'random' (from --seed, offline) or a local .safetensors/.pth file",
    )
    random_init: bool = option(False, "random weights from --seed, for offline use (the same as --weights random)")
    seed: int = option(0, "seed of random weights (in training, also of the split and the shuffles)")

    def __post_init__(self) -> None:
        """`--random-init` is `--weights random`; with a weights file as well, the two contradict each other."""
        if self.random_init:
            if self.weights not in (HUB, RANDOM):
                raise ValueError(f"--random-init and --weights {self.weights} contradict each other: pass one of them")
            self.weights = RANDOM


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; anything else is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class BackboneError(ValueError):
    """A backbone name or weights source that cannot be used."""


def architecture(name: str) -> str:
    """The timm architecture of `name` (`swin_base_patch4_window7_224.ms_in22k` -> without the tag)."""
    arch = name.split(".", 1)[0]
    if arch not in SUPPORTED_BACKBONES:
        raise BackboneError(f"unsupported backbone {name!r}; supported: {', '.join(SUPPORTED_BACKBONES)}")
    return arch


@dataclass(frozen=True)
class HubWeights:
    """The pretrained weights `--weights hub` loads: timm's model name with its tag, and the hub file holding them."""

    model: str
    hf_hub_id: str
    filename: str

    @classmethod
    def of(cls, name: str) -> HubWeights:
        """`name`'s weights: its own tag, else the first of `PREFERRED_TAGS` that timm has for it, else timm's default tag."""
        import timm
        from timm.models import get_pretrained_cfg

        arch = architecture(name)
        pretrained = timm.list_pretrained(f"{arch}.*")
        preferred = [f"{arch}.{tag}" for tag in PREFERRED_TAGS if f"{arch}.{tag}" in pretrained]
        model = name if "." in name else [*preferred, f"{arch}.{get_pretrained_cfg(arch).tag}"][0]
        if model not in pretrained:
            raise BackboneError(f"timm has no pretrained weights {model!r}; those of {arch}: {', '.join(pretrained)}")
        cfg = get_pretrained_cfg(model)
        return cls(model=model, hf_hub_id=cfg.hf_hub_id, filename=cfg.hf_hub_filename or HUB_FILENAME)

    def __str__(self) -> str:
        return f"{self.model} (Hugging Face {self.hf_hub_id}, {self.filename})"

    def fetch(self) -> Path:
        """The local file: from the Hugging Face cache when it holds it, else downloaded after one short look-up of the hub
        (none with HF_HUB_OFFLINE=1), so that an offline start fails in seconds, in one line that says the fix."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
        from huggingface_hub.errors import HfHubHTTPError

        repo_id, _, revision = self.hf_hub_id.partition("@")
        where = {"repo_id": repo_id, "filename": self.filename, "revision": revision or None}
        cached = try_to_load_from_cache(**where)
        if isinstance(cached, str):
            return Path(cached)
        missing = f"--weights hub: {self} is not in the Hugging Face cache at {constants.HF_HUB_CACHE}"
        if constants.HF_HUB_OFFLINE:
            raise BackboneError(f"{missing}, and HF_HUB_OFFLINE keeps the hub out; {OFFLINE_FIX}")
        try:
            get_hf_file_metadata(hf_hub_url(**where), timeout=HUB_TIMEOUT_S)
        except HfHubHTTPError as exc:
            raise BackboneError(f"{missing}, and the hub at {constants.ENDPOINT} refused it ({_first_line(exc)}); {OFFLINE_FIX}") from exc
        except Exception as exc:  # the transport's own errors, whose types change with huggingface_hub's version
            failure = f"{type(exc).__name__}: {_first_line(exc)}"
            raise BackboneError(f"{missing}, and the hub at {constants.ENDPOINT} is unreachable ({failure}); {OFFLINE_FIX}") from exc
        return Path(hf_hub_download(**where, etag_timeout=HUB_TIMEOUT_S))


def _first_line(exc: Exception) -> str:
    """The first line of an error's message, for an error of our own that must stay one line."""
    return (str(exc).splitlines() or [""])[0]


def weights_file(name: str, weights: str | Path) -> tuple[str, Path]:
    """The timm model name and the local file that `weights` (`"hub"` or a path) loads for `name`."""
    if weights == HUB:
        hub = HubWeights.of(name)
        path = hub.fetch()
        log.info("backbone weights: %s at %s", hub, path)
        return hub.model, path
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    return name, path


def describe_weights(name: str, weights: str | Path, seed: int) -> str:
    """Which weights `weights` loads for `name`, in words: the hub's model, tag and file, the local file, or the seed."""
    if weights == RANDOM:
        return f"random (seed {seed})"
    return str(HubWeights.of(name)) if weights == HUB else str(weights)


def create_swin(name: str, weights: str | Path = RANDOM, seed: int = 0, **kwargs) -> SwinTransformer:
    """Create a headless timm Swin.

    `weights` is `"hub"` (timm's pretrained weights of the name's tag, else ImageNet-22k, from the Hugging Face
    cache or hub: `HubWeights`), `"random"` (initialised from `seed`, for offline use and tests), or a path to a
    local `.safetensors`/`.pth` file (read by timm with `weights_only=True`, and converted from the original Swin
    layout when needed).
    """
    import timm

    architecture(name)
    kwargs.setdefault("num_classes", 0)
    if weights == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model_name, path = weights_file(name, weights)
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    return model.eval()


def block_dims(model: SwinTransformer) -> list[tuple[str, int]]:
    """Each Swin block's module path and channel width, in forward order."""
    return [
        (f"layers.{i}.blocks.{j}", block.norm1.normalized_shape[0])
        for i, stage in enumerate(model.layers)
        for j, block in enumerate(stage.blocks)
    ]


@dataclass
class Backbone:
    """A frozen Swin with the fingerprint of its weights and which weights they are; the one instance all tasks share."""

    name: str
    model: SwinTransformer
    fingerprint: str
    weights: str

    @classmethod
    def load(cls, name: str, weights: str | Path = RANDOM, seed: int = 0, **kwargs) -> Backbone:
        """Create the model, freeze it, and fingerprint its weights.

        The model accepts any input size that is a multiple of 32 (timm's `strict_img_size=False`:
        attention masks follow the input), so each task can use its own size.
        """
        kwargs.setdefault("strict_img_size", False)
        model = create_swin(name, weights, seed, **kwargs)
        model.requires_grad_(False)
        return cls(
            name=architecture(name), model=model, fingerprint=fingerprint_module(model), weights=describe_weights(name, weights, seed)
        )

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def stage_dims(self) -> list[int]:
        """Channel width of each stage's output, shallow to deep."""
        return [stage.blocks[-1].norm1.normalized_shape[0] for stage in self.model.layers]

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)


class MonaSwinBlock(SwinTransformerBlock):
    """timm's Swin block with an adapter after the attention residual and after the MLP residual.

    Built by `inject_mona` from an existing block (its class is swapped), so timm's own submodules and
    their state-dict names stay as they are, and so is the forward's signature: a `MonaBank` reads which
    slot each sample uses from its `SlotMapping`, not from an argument.
    """

    mona1: nn.Module
    mona2: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = self.mona1(x)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.mona2(x)


def inject_mona(model: SwinTransformer, make_adapter: Callable[[int], nn.Module]) -> None:
    """Add `make_adapter(width)` as `mona1` and `mona2` to every block of every stage, in place."""
    if not isinstance(model, SwinTransformer):
        raise TypeError(f"expected a timm SwinTransformer, got {type(model).__name__}")
    for path, dim in block_dims(model):
        block = model.get_submodule(path)
        if isinstance(block, MonaSwinBlock):
            raise TypeError(
                f"{path} holds Mona adapters already: a MonaTaskModel injects into its Backbone's model in place, so give "
                "each task model a Backbone of its own (Backbone.load again, or copy.deepcopy(backbone))"
            )
        if type(block) is not SwinTransformerBlock:
            raise TypeError(f"{path} is a {type(block).__name__}, not a plain timm SwinTransformerBlock")
        block.mona1 = make_adapter(dim)
        block.mona2 = make_adapter(dim)
        block.__class__ = MonaSwinBlock


def adapter_modules(model: SwinTransformer) -> dict[str, nn.Module]:
    """The injected adapters by module path (`layers.0.blocks.0.mona1`, ...)."""
    return {
        f"{path}.{position}": getattr(model.get_submodule(path), position)
        for path, _ in block_dims(model)
        for position in ("mona1", "mona2")
    }


NORMED_LAST = 4
"""Index, among `forward_pyramid`'s levels, of the last stage through the backbone's final norm."""


def forward_pyramid(model: SwinTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Run the backbone and return five NHWC levels: each stage's output as it leaves the stage (0-3), then
    the last one through the final norm (`NORMED_LAST`). Each head picks what it reads (`heads.stage_inputs`).

    This is timm's `forward_intermediates` through timm's own stages, less its permute to NCHW (a copy of
    every level that the heads, which read NHWC, would undo).
    """
    x = model.patch_embed(images)
    levels = []
    for stage in model.layers:
        x = stage(x)
        levels.append(x)
    return [*levels, model.norm(x)]
