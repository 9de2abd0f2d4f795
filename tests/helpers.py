"""Test helpers: manifests and random adapter packages for a backbone."""

from monaserve.adapters.synthetic import make_manifest, random_adapter_tensors, random_package, randomize_

TINY = "swin_tiny_patch4_window7_224"

__all__ = ["TINY", "make_manifest", "random_adapter_tensors", "random_package", "randomize_"]
