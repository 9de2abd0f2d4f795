"""Importing Mona adapters trained elsewhere: the official Mona code's checkpoints, and our own files.

The official code (github.com/Leiyi-Hu/mona) trains Mona in the original Swin of its mmdet, mmseg and mmcls
trees (`SwinTransformer_mona`): an mmcv checkpoint whose `state_dict` names the adapters
`backbone.layers.{i}.blocks.{j}.my_module_{1,2}.<param>`, with the parameters named as in our `Mona`. Blocks sit
at the same `layers.{i}.blocks.{j}` in timm, so the adapters map one to one; only the backbone's downsampling
moves (the end of stage i there, the start of stage i+1 in timm), which timm's `checkpoint_filter_fn` converts.
OpenMMLab's own Swins (`stages.{i}`, `attn.w_msa.*`, `ffn.layers.*`, unfold-ordered patch merging) are read too.

The adapters are refused unless they are complete for the backbone and the checkpoint's backbone weights are this
server's, tensor by tensor (a checkpoint without backbone weights is taken, with a warning). With a head package
(`--head-from`) the result is a package; without, a Mona-only file that training can start from (`load_mona_init`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from .compat import check_compatible, listing, mona_shapes
from .config_args import REQUIRED, option
from .fingerprint import short
from .manifest import Manifest
from .mona import INNER_DIM
from .package import METADATA_KEY, AdapterPackage, atomic_write
from .swin import Backbone, BackboneOptions

log = logging.getLogger(__name__)

MONA_INIT_KEY = "monaserve.mona_init"
"""Header metadata key of a Mona-only file (`save_mona_init`): JSON saying what the file is and where it came from."""
MONA_INIT_FORMAT = "monaserve.mona-init/1"
BACKBONE_RTOL = 1e-2
"""Relative tolerance of the backbone comparison: the same weights saved in half precision pass, other weights do not."""
BACKBONE_ATOL = 1e-5

ADAPTER = re.compile(
    r"^(?P<container>layers|stages)\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\."
    r"(?P<word>mona|my_module_)(?P<position>[12])\.(?P<param>.+)$"
)
"""An adapter tensor in any known naming; `word` + `position` is `mona1` (ours) or `my_module_1` (the official code)."""
BACKBONE = re.compile(r"^(patch_embed|layers|stages|absolute_pos_embed|norm)\.")
"""A Swin backbone tensor (not the per-output `norm{i}` of mm* detectors and segmenters, which belong to the task)."""
UNFOLD_ORDER = [0, 2, 1, 3]
"""OpenMMLab's patch merging concatenates the 2x2 neighbours in this order of the original's (its own inverse)."""


class MonaImportError(ValueError):
    """A checkpoint whose Mona adapters cannot be imported for this backbone; the message says why."""


def _unfold_to_original(tensor: torch.Tensor) -> torch.Tensor:
    """A patch merging weight (its last dim the 4C merged channels) from OpenMMLab's unfold order to the original's."""
    channels = tensor.shape[-1] // 4
    grouped = tensor.reshape(*tensor.shape[:-1], channels, 4).transpose(-1, -2)
    return grouped[..., UNFOLD_ORDER, :].reshape(tensor.shape)


def _openmmlab_to_original(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenMMLab Swin backbone tensors under the original Swin's names (the inverse of mmdet's `swin_converter`)."""
    renames = {
        "attn.w_msa.": "attn.",
        "ffn.layers.0.0.": "mlp.fc1.",
        "ffn.layers.1.": "mlp.fc2.",
        "patch_embed.projection.": "patch_embed.proj.",
    }
    out = {}
    for name, tensor in tensors.items():
        original = re.sub(r"^stages\.", "layers.", name)
        for old, new in renames.items():
            original = original.replace(old, new)
        out[original] = _unfold_to_original(tensor) if ".downsample." in name else tensor
    return out


@dataclass(frozen=True)
class Naming:
    """One way a checkpoint names a Swin with Mona: in words, and how its backbone tensors become the original Swin's
    names (which timm's `checkpoint_filter_fn` then takes to timm's; it leaves timm's own names as they are)."""

    label: str
    to_original: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = dict


NAMINGS = {
    ("layers", "mona"): Naming("monaserve (timm Swin, mona1/mona2)"),
    ("layers", "my_module_"): Naming("official Mona (original Swin of its mmdet/mmseg/mmcls code, my_module_1/my_module_2)"),
    ("stages", "my_module_"): Naming("OpenMMLab Swin (stages, attn.w_msa, ffn.layers; my_module_1/my_module_2)", _openmmlab_to_original),
}
"""The namings read, by (container, adapter word) of their adapter tensors."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors (wrappers and prefixes removed) and the backbone fingerprint a monaserve file records."""

    tensors: dict[str, torch.Tensor]
    fingerprint: str | None = None


@dataclass(frozen=True)
class ImportedMona:
    """Mona tensors under our names (float32), and what the import found: the naming, inner width and backbone check."""

    tensors: dict[str, torch.Tensor]
    naming: str
    inner_dim: int
    backbone_verified: bool
    backbone_check: str


def _recorded_fingerprint(metadata: Mapping[str, str]) -> str | None:
    """The backbone fingerprint a package's manifest or a Mona-only file's metadata records; None for other files."""
    if METADATA_KEY in metadata:
        return Manifest.model_validate_json(metadata[METADATA_KEY]).backbone.fingerprint
    if MONA_INIT_KEY in metadata:
        return json.loads(metadata[MONA_INIT_KEY])["backbone"]["fingerprint"]
    return None


def _read_safetensors(path: Path) -> Checkpoint:
    """A `.safetensors` file's tensors and the fingerprint it records."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type from Rust
        raise MonaImportError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return Checkpoint(tensors, _recorded_fingerprint(metadata))


def _read_torch(path: Path) -> Checkpoint:
    """A torch checkpoint's state dict, read with `weights_only=True` (no code from the file runs)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler, zip reader and tensor loader each raise their own types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise MonaImportError(
            f"cannot read {path} with torch.load(weights_only=True) ({type(exc).__name__}: {first}); if the file holds "
            "more than tensors, re-save its state dict alone where you trust it: "
            "torch.save({'state_dict': checkpoint['state_dict']}, 'weights.pth')"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise MonaImportError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return Checkpoint({name: t for name, t in loaded.items() if isinstance(name, str) and isinstance(t, torch.Tensor)})


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint (`.safetensors`, else a torch file) with `module.` (DDP) removed, and, where names start with
    `backbone.` (mm* models), only those, without it: the detector's or segmenter's other modules are not imported."""
    path = Path(path)
    if not path.is_file():
        raise MonaImportError(f"checkpoint not found: {path}")
    checkpoint = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    tensors = {name.removeprefix("module."): t for name, t in checkpoint.tensors.items()}
    if any(name.startswith("backbone.") for name in tensors):
        tensors = {name.removeprefix("backbone."): t for name, t in tensors.items() if name.startswith("backbone.")}
    return Checkpoint(tensors, checkpoint.fingerprint)


def split_adapters(tensors: Mapping[str, torch.Tensor]) -> tuple[Naming, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The checkpoint's naming, its Mona tensors under our names, and its backbone tensors under its own names."""
    matches = {name: ADAPTER.match(name) for name in tensors}
    found = {(m["container"], m["word"]) for m in matches.values() if m}
    if not found:
        raise MonaImportError(
            "no Mona tensors: expected names like layers.0.blocks.0.my_module_1.project1.weight (the official code) or "
            f"layers.0.blocks.0.mona1.project1.weight (monaserve); the checkpoint has {listing(sorted(tensors)) or 'no tensors'}"
        )
    unknown = found - NAMINGS.keys()
    if unknown or len(found) > 1:
        named = ", ".join(f"{container}.*.{word}N" for container, word in sorted(found))
        raise MonaImportError(f"the adapters are named in more than one way, or an unknown one ({named}): one checkpoint, one naming")
    naming = NAMINGS[found.pop()]
    adapters = {
        f"layers.{m['stage']}.blocks.{m['block']}.mona{m['position']}.{m['param']}": tensors[name] for name, m in matches.items() if m
    }
    backbone = {name: t for name, t in tensors.items() if not matches[name] and BACKBONE.match(name)}
    return naming, adapters, backbone


def inner_dim_of(adapters: Mapping[str, torch.Tensor]) -> int:
    """Mona's inner width from the first down projection (the official code's is 64); the default if there is none."""
    first = next((t for name, t in sorted(adapters.items()) if name.endswith(".project1.weight")), None)
    return INNER_DIM if first is None else first.shape[0]


def check_adapters(adapters: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse adapters that are not exactly the expected set with the expected shapes and finite values, naming them."""
    problems = []
    missing = sorted(expected.keys() - adapters.keys())
    if missing:
        problems.append(f"missing {listing(missing)}")
    extra = sorted(adapters.keys() - expected.keys())
    if extra:
        problems.append(f"not in this backbone {listing(extra)}")
    wrong = [
        f"{name} is {tuple(adapters[name].shape)}, expected {shape}"
        for name, shape in sorted(expected.items())
        if name in adapters and tuple(adapters[name].shape) != shape
    ]
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong)}")
    non_finite = sorted(name for name, t in adapters.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if non_finite:
        problems.append(f"NaN or Inf in {listing(non_finite)}")
    if problems:
        raise MonaImportError("the Mona adapters do not fit this backbone (named as monaserve names them): " + "; ".join(problems))


def _differs(name: str, theirs: torch.Tensor, ours: torch.Tensor) -> str | None:
    """How one checkpoint backbone tensor differs from ours, in words; None when they are the same weights."""
    if tuple(theirs.shape) != tuple(ours.shape):
        return f"{name} is {tuple(theirs.shape)} in the checkpoint, {tuple(ours.shape)} here"
    theirs, ours = theirs.float(), ours.float()
    if torch.equal(theirs, ours) or torch.allclose(theirs, ours, rtol=BACKBONE_RTOL, atol=BACKBONE_ATOL):  # equal: the fast, usual case
        return None
    return f"{name} differs by up to {(theirs - ours).abs().max().item():.3g} (its largest value here is {ours.abs().max().item():.3g})"


def compare_backbone(naming: Naming, tensors: Mapping[str, torch.Tensor], backbone: Backbone) -> str:
    """Refuse a checkpoint whose backbone weights are not `backbone`'s; else say how many tensors were compared."""
    try:
        theirs = checkpoint_filter_fn(naming.to_original(tensors), backbone.model)
    except AttributeError as exc:  # a relative position table of a block this backbone lacks
        raise MonaImportError(f"the checkpoint's backbone is not {backbone.name}: {exc}") from None
    ours = backbone.model.state_dict()
    who = f"the checkpoint's backbone weights are not this backbone's ({backbone.name}, {backbone.weights})"
    extra = sorted(theirs.keys() - ours.keys())
    if extra:
        raise MonaImportError(f"{who}: it has tensors {backbone.name} lacks (timm names): {listing(extra)}")
    for name, tensor in ours.items():
        if name in theirs and (difference := _differs(name, theirs[name], tensor)):
            raise MonaImportError(f"{who}: {difference} (timm names); import for the backbone it was trained on")
    absent = [name for name in ours if name not in theirs]
    return f"backbone weights verified ({len(theirs)} tensors match" + (f"; not in the checkpoint: {listing(absent)})" if absent else ")")


def check_backbone(checkpoint: Checkpoint, naming: Naming, tensors: Mapping[str, torch.Tensor], backbone: Backbone) -> tuple[bool, str]:
    """Whether the checkpoint's backbone is verified to be `backbone`, and how (refused when it is verified not to be):
    by the fingerprint a monaserve file records, else weight by weight, else not at all (a warning is logged)."""
    if checkpoint.fingerprint is not None:
        if checkpoint.fingerprint != backbone.fingerprint:
            raise MonaImportError(
                f"the file was made for other weights of its backbone: its fingerprint is {short(checkpoint.fingerprint)}, "
                f"this backbone's ({backbone.name}, {backbone.weights}) is {short(backbone.fingerprint)}"
            )
        return True, "backbone verified (the fingerprint the file records)"
    if tensors:
        return True, compare_backbone(naming, tensors, backbone)
    note = f"backbone NOT verified: the checkpoint holds no backbone weights, so compatibility with {backbone.weights} could not be checked"
    log.warning("import-mona: %s", note)
    return False, note


def import_mona(path: str | Path, backbone: Backbone) -> ImportedMona:
    """Read the Mona adapters of a checkpoint for `backbone`: mapped to our names and checked complete, of the right
    shapes, and trained on `backbone`'s weights; raises `MonaImportError` saying why not."""
    checkpoint = read_checkpoint(path)
    naming, adapters, backbone_tensors = split_adapters(checkpoint.tensors)
    inner_dim = inner_dim_of(adapters)
    check_adapters(adapters, mona_shapes(backbone, inner_dim))
    verified, check = check_backbone(checkpoint, naming, backbone_tensors, backbone)
    tensors = {name: t.detach().float().contiguous() for name, t in adapters.items()}
    return ImportedMona(tensors=tensors, naming=naming.label, inner_dim=inner_dim, backbone_verified=verified, backbone_check=check)


def load_mona_init(path: str | Path, backbone: Backbone | None = None) -> dict[str, torch.Tensor]:
    """Mona tensors under our names (`layers.{i}.blocks.{j}.mona{1,2}.<param>`) to start training from: from an official
    checkpoint, a `save_mona_init` file or a package. With `backbone`, everything `import_mona` checks is checked;
    without, the names are mapped only (load them strictly into the model to check their shapes)."""
    if backbone is not None:
        return import_mona(path, backbone).tensors
    _, adapters, _ = split_adapters(read_checkpoint(path).tensors)
    return {name: t.detach().float().contiguous() for name, t in adapters.items()}


def save_mona_init(imported: ImportedMona, backbone: Backbone, source: str, path: str | Path) -> Path:
    """Write the imported Mona alone as safetensors, with `MONA_INIT_KEY` metadata: the format, the backbone (its
    fingerprint only when verified), the inner width, the source file and its naming."""
    fingerprint = backbone.fingerprint if imported.backbone_verified else None
    metadata = {
        "format": MONA_INIT_FORMAT,
        "backbone": {"name": backbone.name, "fingerprint": fingerprint},
        "mona_inner_dim": imported.inner_dim,
        "source": source,
        "naming": imported.naming,
    }
    return atomic_write(path, safetensors.torch.save(imported.tensors, metadata={MONA_INIT_KEY: json.dumps(metadata)}))


def with_head(
    imported: ImportedMona, head: AdapterPackage, backbone: Backbone, source: str, name: str | None, version: int | None
) -> AdapterPackage:
    """A package of the imported Mona and `head`'s head: its kind, labels, head config, input and head tensors, under
    `name` (default: the head's) and `version` (default: the head's next), once `head` is checked to fit `backbone`."""
    try:
        check_compatible(head, backbone)
    except ValueError as exc:
        raise MonaImportError(f"--head-from: {exc}") from None
    fields = head.manifest.model_dump(exclude={"created_at"})
    fields.update(
        name=head.manifest.name if name is None else name,
        version=head.manifest.version + 1 if version is None else version,
        mona_inner_dim=imported.inner_dim,
        training={
            "imported": {"checkpoint": source, "naming": imported.naming, "backbone": imported.backbone_check},
            "head_from": {"name": head.manifest.name, "version": head.manifest.version},
        },
    )
    tensors = {**imported.tensors, **{n: t for n, t in head.tensors.items() if n.startswith("head.")}}
    return AdapterPackage(manifest=Manifest.model_validate(fields), tensors=tensors)


@dataclass
class ImportConfig(BackboneOptions):
    """Everything `monaserve import-mona` takes: each field's default and help are the command line's."""

    checkpoint: Path = option(REQUIRED, "the checkpoint: the official Mona code's .pth, a .safetensors, or a package", positional=True)
    head_from: Path | None = option(None, "a package for this backbone: the new package takes its kind, labels, input and head")
    name: str | None = option(None, "the new package's task name (default: the --head-from package's)")
    version: int | None = option(None, "the new package's version (default: the --head-from package's, plus one)")
    out: Path | None = option(
        None, "output file (default: NAME-VERSION.safetensors, or CHECKPOINT-mona-init.safetensors without --head-from)"
    )

    def __post_init__(self) -> None:
        """`--name` and `--version` name a package, which only `--head-from` makes."""
        super().__post_init__()
        if self.head_from is None and (self.name is not None or self.version is not None):
            raise ValueError("--name and --version name a package, which needs --head-from; without it the output is Mona alone")


def run_import(config: ImportConfig) -> str:
    """Import `config.checkpoint` for the configured backbone and write the package or Mona-only file; returns one line
    saying what was written."""
    backbone = Backbone.load(config.backbone, config.weights, seed=config.seed)
    imported = import_mona(config.checkpoint, backbone)
    source = config.checkpoint.name
    mapped = f"{len(imported.tensors)} Mona tensors mapped from the {imported.naming} naming; {imported.backbone_check}"
    if config.head_from is None:
        out = config.out or Path(f"{config.checkpoint.stem}-mona-init.safetensors")
        _refuse_overwriting(out, config.checkpoint)
        save_mona_init(imported, backbone, source, out)
        return f"wrote {out} (Mona only, for training to start from): {mapped}"
    package = with_head(imported, AdapterPackage.read(config.head_from), backbone, source, config.name, config.version)
    manifest = package.manifest
    out = config.out or Path(f"{manifest.name}-{manifest.version}.safetensors")
    _refuse_overwriting(out, config.checkpoint, config.head_from)
    package.save(out)
    return f"wrote {out} (package {manifest.name} v{manifest.version}, {manifest.kind}, head from {config.head_from.name}): {mapped}"


def _refuse_overwriting(out: Path, *inputs: Path) -> None:
    """Refuse an output path that is one of the inputs."""
    if any(out.resolve() == path.resolve() for path in inputs):
        raise MonaImportError(f"--out {out} is an input of the import: write elsewhere")
