"""The model side of monaserve: Mona adapters on a frozen timm Swin, task heads, and adapter packages.

Importable without FastAPI.
"""

from .accounting import AdapterBudget, adapter_budget, mona_parameters, paper_eq6_parameters
from .bank import MonaBank, MonaKernel, SlotMapping
from .compat import check_compatible, expected_shapes
from .fingerprint import fingerprint_module
from .heads import ClassifyHead, DetectHead, SegmentHead, head_tensors, load_head
from .import_mona import MonaImportError, import_mona, load_mona_init
from .kinds import KINDS, ClassifyHeadConfig, DetectHeadConfig, SegmentHeadConfig, TaskKind, build_head, get_kind
from .manifest import FORMAT, TASK_NAME_PATTERN, BackboneRef, InputSpec, Manifest, validate_task_name
from .mona import INNER_DIM, FoldedMona, Mona, fold_mona, fold_mona_state
from .package import AdapterError, AdapterPackage, IncompatibleAdapterError, PackageFormatError, read_manifest, with_version
from .swin import (
    SUPPORTED_BACKBONES,
    Backbone,
    BackboneError,
    adapter_modules,
    create_swin,
    forward_pyramid,
    inject_mona,
)
from .task_model import MonaTaskModel

__all__ = [
    "FORMAT",
    "INNER_DIM",
    "KINDS",
    "SUPPORTED_BACKBONES",
    "TASK_NAME_PATTERN",
    "AdapterBudget",
    "AdapterError",
    "AdapterPackage",
    "Backbone",
    "BackboneError",
    "BackboneRef",
    "ClassifyHead",
    "ClassifyHeadConfig",
    "DetectHead",
    "DetectHeadConfig",
    "FoldedMona",
    "IncompatibleAdapterError",
    "InputSpec",
    "Manifest",
    "Mona",
    "MonaBank",
    "MonaImportError",
    "MonaTaskModel",
    "PackageFormatError",
    "SegmentHead",
    "SegmentHeadConfig",
    "MonaKernel",
    "SlotMapping",
    "TaskKind",
    "adapter_budget",
    "adapter_modules",
    "build_head",
    "check_compatible",
    "create_swin",
    "expected_shapes",
    "fingerprint_module",
    "fold_mona",
    "fold_mona_state",
    "forward_pyramid",
    "get_kind",
    "head_tensors",
    "import_mona",
    "inject_mona",
    "load_head",
    "load_mona_init",
    "mona_parameters",
    "paper_eq6_parameters",
    "read_manifest",
    "with_version",
    "validate_task_name",
]
