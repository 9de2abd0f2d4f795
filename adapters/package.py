"""The adapter package: one `.safetensors` file per task version, with the manifest in its header metadata.

Tensors are named as in the adapted model: `layers.{i}.blocks.{j}.mona{1,2}.<param>` for Mona and
`head.<param>` for the task head. Reading validates everything a file can get wrong on its own (format,
manifest, dtypes, NaN/Inf); `check_compatible` then checks it against the backbone it is to run on.
Never pickle: nothing here executes code from a file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from pydantic import ValidationError

from .manifest import Manifest

METADATA_KEY = "monaserve.manifest"
MAX_PACKAGE_BYTES = 512 * 2**20
MAX_HEADER_BYTES = 32 * 2**20
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FOREIGN_MAGIC = {b"\x80": "a Python pickle", b"PK\x03\x04": "a zip archive (the torch.save format)"}


class AdapterError(ValueError):
    """An adapter package that cannot be used; the message says what and why."""


class PackageFormatError(AdapterError):
    """The file itself is wrong: not safetensors, bad manifest, bad dtype, NaN/Inf."""


class IncompatibleAdapterError(AdapterError):
    """A well-formed package made for another backbone or another layout."""


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in error.errors(include_url=False)
    )


def _not_safetensors(data: bytes, why: str) -> PackageFormatError:
    """An error for a file that is not safetensors, saying what it looks like when that is recognisable."""
    looks = next((f"; it looks like {what}" for magic, what in _FOREIGN_MAGIC.items() if data.startswith(magic)), "")
    return PackageFormatError(f"not a safetensors file: {why}{looks} (adapter packages are safetensors only)")


def _read_header(data: bytes) -> dict:
    """The safetensors JSON header, checked for size before it is parsed."""
    if len(data) < 8:
        raise _not_safetensors(data, f"{len(data)} bytes is too short for a header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise _not_safetensors(
            data, f"header length {length} exceeds the file ({len(data)} bytes) or the {MAX_HEADER_BYTES} byte limit"
        )
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_safetensors(data, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(data, "header is not a JSON object")
    return header


@dataclass(frozen=True)
class AdapterPackage:
    """One task version: its manifest and its Mona + head tensors."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def subset(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (e.g. `"head."`), with the prefix removed."""
        return {name.removeprefix(prefix): t for name, t in self.tensors.items() if name.startswith(prefix)}

    def to_bytes(self) -> bytes:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors.items()}
        return safetensors.torch.save(tensors, metadata={METADATA_KEY: self.manifest.model_dump_json()})

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, fsynced, then renamed over `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_bytes(cls, data: bytes) -> AdapterPackage:
        """Parse and validate a package; raises `PackageFormatError` naming the problem."""
        if len(data) > MAX_PACKAGE_BYTES:
            raise PackageFormatError(f"package is {len(data)} bytes; the limit is {MAX_PACKAGE_BYTES}")
        header = _read_header(data)
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises its own error type from Rust
            raise PackageFormatError(f"not a valid safetensors file: {exc}") from None
        metadata = header.get("__metadata__") or {}
        if METADATA_KEY not in metadata:
            raise PackageFormatError(f"no manifest: the safetensors header metadata has no {METADATA_KEY!r} entry")
        try:
            manifest = Manifest.model_validate_json(metadata[METADATA_KEY])
        except ValidationError as exc:
            raise PackageFormatError(f"invalid manifest: {_describe(exc)}") from None
        bad_dtype = sorted(f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in FLOAT_DTYPES)
        if bad_dtype:
            raise PackageFormatError(f"tensors must be float32/float16/bfloat16; not so: {', '.join(bad_dtype[:5])}")
        non_finite = sorted(n for n, t in tensors.items() if not torch.isfinite(t).all())
        if non_finite:
            raise PackageFormatError(f"tensors with NaN or Inf values: {', '.join(non_finite[:5])}")
        return cls(manifest=manifest, tensors=tensors)

    @classmethod
    def read(cls, path: str | Path) -> AdapterPackage:
        path = Path(path)
        size = path.stat().st_size
        if size > MAX_PACKAGE_BYTES:
            raise PackageFormatError(f"{path} is {size} bytes; the limit is {MAX_PACKAGE_BYTES}")
        return cls.from_bytes(path.read_bytes())
