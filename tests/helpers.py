"""Test helpers: manifests and random adapter packages for a backbone, the server's own image preparation,
and what readiness must say while the demo trains."""

import re

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


def assert_demo_progress(seen: list[dict], log: str) -> None:
    """Readiness said, while the demo trained, which task of the three and the time left; so did the log."""
    training = [body for body in seen if body.get("activity") == "training demo"]
    assert training and {body["status"] for body in training} == {"loading"}, seen
    assert {body["step"] for body in training} <= {"1/3", "2/3", "3/3"} and len({body["step"] for body in training}) >= 2, seen
    assert any(body.get("eta_s", 0) > 0 for body in training), seen
    assert re.search(r"demo: task 3/3, shapes-segment; about \d+ (s|min) left in all", log), log


__all__ = ["TINY", "assert_demo_progress", "make_manifest", "prepare_as_served", "random_adapter_tensors", "random_package", "randomize_"]
