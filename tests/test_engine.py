"""The engine: a mixed-task batch equals each image alone and the unfolded reference model of its task."""

from __future__ import annotations

import pytest
import torch

from monaserve.adapters import (
    SUPPORTED_BACKBONES,
    AdapterPackage,
    Backbone,
    IncompatibleAdapterError,
    MonaTaskModel,
    expected_shapes,
)
from monaserve.server.engine import Engine

from helpers import TINY, random_package

REDUCED_DEPTHS = (2, 2, 2, 2)  # every width, window and shifted block of the backbone, fewer repeats


def reference_outputs(backbone: Backbone, package: AdapterPackage, images: torch.Tensor) -> torch.Tensor:
    """Predictions (class probabilities) of the unfolded, single-task reference model with `package` loaded."""
    model = MonaTaskModel(backbone, package.manifest).eval()
    model.load_package(package)
    return torch.stack(model.predict(images))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture
def tasks(tiny_backbone):
    """An engine on Swin-T with three tasks in slots 0, 1 and 3 (slot 2 left empty)."""
    engine = Engine(tiny_backbone, num_slots=4)
    packages = {
        slot: random_package(tiny_backbone, name, seed=slot, num_labels=n)
        for slot, name, n in [(0, "birds", 4), (1, "cars", 6), (3, "dogs", 3)]
    }
    for slot, package in packages.items():
        engine.install(slot, package)
    return engine, packages


def test_mixed_batch_equals_each_image_alone_and_the_reference(tasks, tiny_weights):
    engine, packages = tasks
    images = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    slots = [0, 1, 3, 3, 0, 1]
    mixed = engine.run(images, slots)
    assert [tuple(o.shape) for o in mixed] == [(4,), (6,), (3,), (3,), (4,), (6,)]
    for i, slot in enumerate(slots):
        alone = engine.run(images[i : i + 1], [slot])[0]
        torch.testing.assert_close(mixed[i], alone, rtol=1e-4, atol=1e-4)
    for slot, package in packages.items():
        index = [i for i, s in enumerate(slots) if s == slot]
        expected = reference_outputs(Backbone.load(TINY, tiny_weights), package, images[index])
        torch.testing.assert_close(torch.stack([mixed[i] for i in index]), expected, rtol=1e-4, atol=1e-4)
    assert len({tuple(mixed[i].shape) for i in range(6)}) == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_folded_engine_equals_reference_model_on_every_backbone(name):
    """fp32, random weights with non-trivial gamma, through every block of the (reduced-depth) backbone."""
    kwargs = {} if name == TINY else {"depths": REDUCED_DEPTHS}
    engine_backbone = Backbone.load(name, "random", seed=0, **kwargs)
    package = random_package(engine_backbone, "task", seed=1)
    engine = Engine(engine_backbone, num_slots=2)
    engine.install(1, package)
    images = torch.randn(2, 3, *engine_backbone.input_size, generator=torch.Generator().manual_seed(2))
    folded = torch.stack(engine.run(images, [1, 1]))
    reference = reference_outputs(Backbone.load(name, "random", seed=0, **kwargs), package, images)
    assert relative_error(folded, reference) < 1e-5
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-5)


def test_failed_install_keeps_the_previous_adapter(tasks, tiny_backbone):
    engine, packages = tasks
    images = torch.randn(2, 3, 224, 224)
    before = engine.run(images, [0, 0])
    broken = dict(random_package(tiny_backbone, "birds", seed=9, num_labels=4, version=2).tensors)
    broken["layers.3.blocks.1.mona2.project2.weight"] = torch.zeros(768, 32)
    with pytest.raises(IncompatibleAdapterError, match="wrong shapes"):
        engine.install(0, AdapterPackage(packages[0].manifest.model_copy(update={"version": 2}), broken))
    after = engine.run(images, [0, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert engine.manifests[0].version == 1


def test_reinstall_switches_the_slot_to_the_new_version(tasks, tiny_backbone):
    engine, _ = tasks
    images = torch.randn(1, 3, 224, 224)
    v1 = engine.run(images, [0])[0]
    engine.install(0, random_package(tiny_backbone, "birds", seed=42, num_labels=4, version=2))
    assert engine.manifests[0].version == 2
    assert not torch.allclose(engine.run(images, [0])[0], v1)


def test_evicted_and_empty_slots_refuse_to_run(tasks):
    engine, _ = tasks
    images = torch.randn(2, 3, 224, 224)
    with pytest.raises(LookupError, match="slot 2 holds no adapter"):
        engine.run(images, [0, 2])
    dogs = engine.run(images[:1], [3])[0]
    engine.evict(1)
    with pytest.raises(LookupError, match="slot 1 holds no adapter"):
        engine.run(images, [1, 3])
    torch.testing.assert_close(engine.run(images[:1], [3])[0], dogs)
    assert all(bank.up[1].abs().sum() == 0 for bank in engine.banks.values())


def test_bad_slot_arguments(tasks):
    engine, packages = tasks
    images = torch.randn(2, 3, 224, 224)
    with pytest.raises(IndexError, match="slot 4 out of range 0..3"):
        engine.run(images, [0, 4])
    with pytest.raises(IndexError, match="slot -1 out of range"):
        engine.install(-1, packages[0])
    with pytest.raises(ValueError, match="one slot per image"):
        engine.run(images, [0])
    with pytest.raises(ValueError, match="at least one adapter slot"):
        Engine(Backbone.load(TINY, "random"), num_slots=0)


def test_inner_dim_must_match_the_engine(tiny_backbone):
    engine = Engine(tiny_backbone, num_slots=1)
    manifest = random_package(tiny_backbone, "narrow", seed=0).manifest.model_copy(update={"mona_inner_dim": 32})
    from helpers import random_adapter_tensors

    package = AdapterPackage(manifest, random_adapter_tensors(expected_shapes(manifest, tiny_backbone), seed=0))
    with pytest.raises(IncompatibleAdapterError, match="inner dim 32; this engine runs 64"):
        engine.install(0, package)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a GPU")
def test_cuda_bf16_engine_matches_cpu_reference(tiny_weights):
    backbone = Backbone.load(TINY, tiny_weights)
    packages = [random_package(backbone, f"t{i}", seed=i) for i in range(3)]
    engine = Engine(backbone, num_slots=3, device="cuda")
    assert engine.dtype == torch.bfloat16
    for slot, package in enumerate(packages):
        engine.install(slot, package)
    images = torch.randn(6, 3, 224, 224)
    slots = [0, 1, 2, 2, 1, 0]
    mixed = engine.run(images, slots)
    for slot, package in enumerate(packages):
        index = [i for i, s in enumerate(slots) if s == slot]
        expected = reference_outputs(Backbone.load(TINY, tiny_weights), package, images[index])
        assert relative_error(torch.stack([mixed[i] for i in index]), expected) < 3e-2


def test_uint8_batches_are_normalised_on_the_device_with_each_samples_own_task(tiny_backbone, shared_backbone):
    """uint8 images in, each sample normalised with its own task's mean and std: the same as normalising
    each one first and handing the engine floats, and the same as the reference model fed uint8."""
    from monaserve.adapters import InputSpec, MonaTaskModel
    from monaserve.adapters.transforms import normalize, spec_norm

    specs = [InputSpec(size=(224, 224)), InputSpec(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.25, 0.3, 0.2))]
    packages = [random_package(shared_backbone, f"t{i}", seed=i, num_labels=3, input=spec) for i, spec in enumerate(specs)]
    engine = Engine(tiny_backbone, num_slots=2)
    for slot, package in enumerate(packages):
        engine.install(slot, package)
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    slots = [1, 0, 1, 0]
    from_uint8 = engine.run(images, slots)
    normalised = torch.stack([normalize(images[i], *spec_norm(specs[s])) for i, s in enumerate(slots)])
    torch.testing.assert_close(torch.stack(from_uint8), torch.stack(engine.run(normalised, slots)), rtol=1e-5, atol=1e-6)
    reference = MonaTaskModel(Backbone.load(TINY, "random", seed=1234), packages[1].manifest).eval()
    reference.load_package(packages[1])
    torch.testing.assert_close(torch.stack(from_uint8)[[0, 2]], torch.stack(reference.predict(images[[0, 2]])), rtol=1e-4, atol=1e-4)


def test_a_second_task_model_on_one_backbone_says_how_to_make_it(shared_backbone):
    """A MonaTaskModel injects into its Backbone's model in place: a second one on the same Backbone is
    refused with what to do instead, and doing that works."""
    import copy

    backbone = copy.deepcopy(shared_backbone)
    manifest = random_package(backbone, "first", seed=1).manifest
    MonaTaskModel(backbone, manifest)
    with pytest.raises(TypeError, match=r"give each task model a Backbone of its own \(Backbone.load again, or copy.deepcopy"):
        MonaTaskModel(backbone, manifest)
    fresh = copy.deepcopy(shared_backbone)
    second = MonaTaskModel(fresh, manifest).eval()
    assert second(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape[-1] == len(manifest.labels)
