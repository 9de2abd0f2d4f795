"""`monaserve import-mona`: checkpoints in the official Mona code's namings, made from our own model, import to the
same tensors and serve the same outputs; foreign backbones and incomplete adapters are refused, saying why."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from monaserve.adapters import AdapterPackage, Backbone, BackboneRef, MonaTaskModel, check_compatible
from monaserve.adapters.import_mona import MonaImportError, import_mona, load_mona_init, save_mona_init, with_head
from monaserve.server.cli import main

from helpers import TINY, random_package

MMDET_UNFOLD = [0, 2, 1, 3]


def mona_of(package: AdapterPackage) -> dict[str, torch.Tensor]:
    """A package's Mona tensors (all but the head)."""
    return {name: t for name, t in package.tensors.items() if not name.startswith("head.")}


def to_original(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names as the official code's original Swin has them: `my_module_N`, downsampling at the end of the stage
    before, and per-output norms in place of the final one, as an mmdet checkpoint holds them."""
    out = {}
    for name, tensor in timm_state.items():
        name = re.sub(r"\.mona([12])\.", r".my_module_\1.", name)
        name = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", name)
        if not name.startswith("norm."):
            out[name] = tensor
    for i, width in enumerate((96, 192, 384, 768)):
        out[f"norm{i}.weight"], out[f"norm{i}.bias"] = torch.ones(width), torch.zeros(width)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)  # a buffer, skipped
    return out


def mmdet_unfold_order(tensor: torch.Tensor) -> torch.Tensor:
    """mmdet's `swin_converter` reordering of a patch merging weight (last dim 4C) into OpenMMLab's unfold order."""
    grouped = tensor.reshape(*tensor.shape[:-1], 4, tensor.shape[-1] // 4)[..., MMDET_UNFOLD, :]
    return grouped.transpose(-1, -2).reshape(tensor.shape)


def to_openmmlab(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Swin's names as OpenMMLab's own Swin has them (mmdet's `swin_converter`)."""
    renames = {
        "attn.": "attn.w_msa.",
        "mlp.fc1.": "ffn.layers.0.0.",
        "mlp.fc2.": "ffn.layers.1.",
        "patch_embed.proj.": "patch_embed.projection.",
    }
    out = {}
    for name, tensor in original.items():
        new = re.sub(r"^layers\.", "stages.", name)
        for old, replacement in renames.items():
            new = new.replace(old, replacement)
        out[new] = mmdet_unfold_order(tensor) if ".downsample." in name else tensor
    return out


def mmdet_checkpoint(backbone_state: dict[str, torch.Tensor], mona: dict[str, torch.Tensor], openmmlab: bool = False) -> dict:
    """What the official code's mmdet saves: the model's state dict under `backbone.` and its neck and heads."""
    original = to_original({**backbone_state, **mona})
    model = to_openmmlab(original) if openmmlab else original
    state = {f"backbone.{name}": t.clone() for name, t in model.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 96, 1, 1)
    return {"state_dict": state, "meta": {"epoch": 12, "mmcv_version": "1.4.0", "CLASSES": ("cat", "dog")}}


def save(checkpoint: dict, path: Path) -> Path:
    """Write a checkpoint as torch does, or its state dict as safetensors."""
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(checkpoint["state_dict"], path)
    else:
        torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def backbone(tiny_weights: Path) -> Backbone:
    """The backbone imports are checked against (read-only: models inject into copies)."""
    return Backbone.load(TINY, tiny_weights)


@pytest.fixture(scope="module")
def package(backbone: Backbone) -> AdapterPackage:
    """A task as if trained: random Mona and head; its Mona is what the checkpoints hold."""
    return random_package(backbone, "pets", seed=3, num_labels=3)


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone, package: AdapterPackage) -> Path:
    """An official mmdet checkpoint of `package`'s Mona on `backbone`."""
    checkpoint = mmdet_checkpoint(backbone.model.state_dict(), mona_of(package))
    return save(checkpoint, tmp_path_factory.mktemp("official") / "mona_swin_t.pth")


@pytest.mark.parametrize(
    ("suffix", "openmmlab", "naming"),
    [(".pth", False, "official Mona"), (".safetensors", False, "official Mona"), (".pth", True, "OpenMMLab Swin")],
    ids=["official-pth", "official-safetensors", "openmmlab-pth"],
)
def test_checkpoints_import_to_the_same_tensors(tmp_path, backbone, package, suffix, openmmlab, naming):
    checkpoint = mmdet_checkpoint(backbone.model.state_dict(), mona_of(package), openmmlab=openmmlab)
    imported = import_mona(save(checkpoint, tmp_path / f"ckpt{suffix}"), backbone)
    assert imported.tensors.keys() == mona_of(package).keys()
    assert all(torch.equal(imported.tensors[name], t) for name, t in mona_of(package).items())
    assert imported.naming.startswith(naming) and imported.inner_dim == 64
    assert (
        imported.backbone_verified
        and "verified (169 tensors match; not in the checkpoint: norm.weight, norm.bias)" in imported.backbone_check
    )


def test_the_imported_package_serves_as_the_original(tmp_path, backbone, package, official):
    imported = with_head(import_mona(official, backbone), package, backbone, official.name, name=None, version=None)
    assert (imported.manifest.name, imported.manifest.version, imported.manifest.labels) == ("pets", 2, package.manifest.labels)
    assert imported.manifest.training["head_from"] == {"name": "pets", "version": 1}
    original, served = (MonaTaskModel(copy.deepcopy(backbone), p.manifest).eval() for p in (package, imported))
    original.load_package(package)
    served.load_package(AdapterPackage.read(imported.save(tmp_path / "pets-2.safetensors")))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(served.predict(images)), torch.stack(original.predict(images)))


def test_foreign_backbone_weights_are_refused(tmp_path, backbone, package):
    foreign = Backbone.load(TINY, "random", seed=7).model.state_dict()
    path = save(mmdet_checkpoint(foreign, mona_of(package)), tmp_path / "foreign.pth")
    with pytest.raises(MonaImportError, match=r"backbone weights are not this backbone's .*: patch_embed\.proj\.weight differs by up to"):
        import_mona(path, backbone)


def test_missing_extra_and_misshapen_adapters_are_refused_by_name(tmp_path, backbone, package):
    mona = dict(mona_of(package))
    del mona["layers.0.blocks.0.mona1.gamma"]
    mona["layers.3.blocks.2.mona1.gamma"] = torch.ones(768)
    mona["layers.1.blocks.0.mona2.gamma"] = torch.tensor(1e-6)
    path = save(mmdet_checkpoint(backbone.model.state_dict(), mona), tmp_path / "broken.pth")
    with pytest.raises(MonaImportError) as refused:
        import_mona(path, backbone)
    message = str(refused.value)
    assert "missing layers.0.blocks.0.mona1.gamma" in message
    assert "not in this backbone layers.3.blocks.2.mona1.gamma" in message
    assert "wrong shapes: layers.1.blocks.0.mona2.gamma is (), expected (192,)" in message


def test_a_checkpoint_without_mona_is_refused(tmp_path, backbone):
    path = save({"state_dict": {f"backbone.{n}": t for n, t in backbone.model.state_dict().items()}}, tmp_path / "plain.pth")
    with pytest.raises(MonaImportError, match=r"no Mona tensors: expected names like layers\.0\.blocks\.0\.my_module_1"):
        import_mona(path, backbone)


def test_without_backbone_weights_it_imports_with_a_warning(tmp_path, backbone, package, caplog):
    adapters = {n: t for n, t in mmdet_checkpoint({}, mona_of(package))["state_dict"].items() if "my_module" in n}
    with caplog.at_level(logging.WARNING):
        imported = import_mona(save({"state_dict": adapters}, tmp_path / "adapters.pth"), backbone)
    assert not imported.backbone_verified and "could not be checked" in caplog.text
    assert all(torch.equal(imported.tensors[name], t) for name, t in mona_of(package).items())


def test_mona_init_from_every_source(tmp_path, backbone, package, official):
    expected = mona_of(package)
    init = save_mona_init(import_mona(official, backbone), backbone, official.name, tmp_path / "init.safetensors")
    package_path = package.save(tmp_path / "pets-1.safetensors")
    for source in (official, init, package_path):
        for loaded in (load_mona_init(source), load_mona_init(source, backbone)):
            assert loaded.keys() == expected.keys() and all(torch.equal(loaded[n], t) for n, t in expected.items()), source
    other = AdapterPackage(
        package.manifest.model_copy(update={"backbone": BackboneRef(name=TINY, fingerprint="sha256:" + "0" * 64)}), package.tensors
    )
    with pytest.raises(MonaImportError, match="made for other weights of its backbone: its fingerprint is 000000000000"):
        load_mona_init(other.save(tmp_path / "other.safetensors"), backbone)


def test_the_command_line(tmp_path, capsys, backbone, package, official, tiny_weights):
    head = package.save(tmp_path / "pets-1.safetensors")
    out = tmp_path / "imported.safetensors"
    common = [str(official), "--weights", str(tiny_weights)]
    assert main(["import-mona", *common, "--head-from", str(head), "--name", "pets-imported", "--version", "7", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"wrote {out} (package pets-imported v7, classify, head from pets-1.safetensors)" in line
    assert "384 Mona tensors mapped from the official Mona" in line and "backbone weights verified" in line
    written = AdapterPackage.read(out)
    check_compatible(written, backbone)
    assert all(torch.equal(written.tensors[n], t) for n, t in package.tensors.items())

    init = tmp_path / "init.safetensors"
    assert main(["import-mona", *common, "--out", str(init)]) == 0
    assert f"wrote {init} (Mona only, for training to start from): 384 Mona tensors" in capsys.readouterr().out
    assert load_mona_init(init, backbone).keys() == mona_of(package).keys()

    assert main(["import-mona", *common, "--name", "pets"]) == 2
    assert "monaserve import-mona: error: --name and --version name a package, which needs --head-from" in capsys.readouterr().err
