"""Test helpers: manifests and random adapter packages for a backbone, and the server's own image preparation."""

from monaserve.adapters.manifest import InputSpec
from monaserve.adapters.synthetic import make_manifest, random_adapter_tensors, random_package, randomize_
from monaserve.adapters.transforms import Prepared, preprocess
from monaserve.server.images import ImageLimits, decode, open_images

TINY = "swin_tiny_patch4_window7_224"


def prepare_as_served(data: bytes, spec: InputSpec) -> Prepared:
    """One encoded image prepared exactly as the server prepares it for a task with `spec`."""
    (opened,) = open_images([data], ImageLimits(), spec.size)
    decoded = decode(opened)
    return preprocess(decoded.image, spec, original_size=decoded.original_size)


__all__ = ["TINY", "make_manifest", "prepare_as_served", "random_adapter_tensors", "random_package", "randomize_"]
