"""The adapter package: one `.safetensors` file per task version, with the manifest in its header metadata.

Tensors are named as in the adapted model: `layers.{i}.blocks.{j}.mona{1,2}.<param>` for Mona and
`head.<param>` for the task head. Reading validates everything a file can get wrong on its own (format,
manifest, dtypes, NaN/Inf); `check_compatible` then checks it against the backbone it is to run on.
Never pickle: nothing here executes code from a file.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch
from pydantic import ValidationError

from .manifest import Manifest

METADATA_KEY = "monaserve.manifest"
MAX_PACKAGE_BYTES = 512 * 2**20
MAX_HEADER_BYTES = 32 * 2**20
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FOREIGN_FORMATS = {
    rb"\x80[\x02-\x05]": "a Python pickle",
    rb"PK\x03\x04": "a zip archive (the torch.save format)",
    rb"\xff\xd8\xff": "a JPEG image",
    rb"\x89PNG\r\n": "a PNG image",
    rb"RIFF....WEBP": "a WebP image",
    rb"--[!-~]{1,70}\r\n": "a multipart form (curl -F): send the file itself, curl --data-binary @FILE",
}
"""What a file that is not safetensors looks like, by how it starts (its first `SNIFF_BYTES`)."""
SNIFF_BYTES = 80


class AdapterError(ValueError):
    """An adapter package that cannot be used; the message says what and why."""


class PackageFormatError(AdapterError):
    """The file itself is wrong: not safetensors, bad manifest, bad dtype, NaN/Inf."""


class IncompatibleAdapterError(AdapterError):
    """A well-formed package made for another backbone or another layout."""


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in error.errors(include_url=False))


def _not_safetensors(start: bytes, why: str) -> PackageFormatError:
    """An error for a file that is not safetensors (`start`: its first bytes): what it looks like when that is recognisable, then `why`."""
    looks = next((f"it looks like {what}; " for pattern, what in _FOREIGN_FORMATS.items() if re.match(pattern, start, re.DOTALL)), "")
    return PackageFormatError(f"not a safetensors file: {looks}{why} (adapter packages are safetensors only)")


def _header_length(first: bytes, size: int) -> int:
    """The header length from a file's first bytes (8 or more), checked against the file size and the limit."""
    if size < 8:
        raise _not_safetensors(first, f"{size} bytes is too short for a header")
    (length,) = struct.unpack("<Q", first[:8])
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise _not_safetensors(first, f"header length {length} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES} byte limit")
    return length


def _parse_header(first: bytes, raw: bytes) -> dict:
    """The safetensors JSON header from its raw bytes."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _not_safetensors(first, f"header is not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(first, "header is not a JSON object")
    return header


def _check_whole(data: bytes, length: int, header: dict) -> None:
    """Refuse a file shorter than its header says (a cut-short upload or copy), saying so."""
    offsets = [entry.get("data_offsets") for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)]
    ends = [pair[1] for pair in offsets if isinstance(pair, list) and len(pair) == 2 and type(pair[1]) is int]
    wanted = 8 + length + max(ends, default=0)  # a malformed entry is safetensors' own error to report
    if len(data) < wanted:
        raise PackageFormatError(f"the package is truncated: {len(data)} of the {wanted} bytes its header describes (was it cut short?)")


def _manifest_from(header: dict) -> Manifest:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise PackageFormatError(f"no manifest: the safetensors header metadata has no {METADATA_KEY!r} entry")
    try:
        return Manifest.model_validate_json(metadata[METADATA_KEY])
    except ValidationError as exc:
        raise PackageFormatError(f"invalid manifest: {_describe(exc)}") from None


def read_manifest(path: str | Path) -> Manifest:
    """A package's manifest from its header alone, without reading the tensors."""
    path = Path(path)
    with path.open("rb") as f:
        return read_manifest_from(f, path.stat().st_size)


def read_manifest_from(file: BinaryIO, size: int) -> Manifest:
    """`read_manifest` on an open binary file (local or remote) of `size` bytes, positioned at its start."""
    first = file.read(8)
    length = _header_length(first, size)
    return _manifest_from(_parse_header(first, file.read(length)))


def atomic_write(path: str | Path, data: bytes, overwrite: bool = True, make_parents: bool = True) -> Path:
    """Write `data` to a temp file in the same folder, fsync it, then move it into place.

    Readers never see half a file. With `overwrite=False` the final step is a hard link, which fails
    with `FileExistsError` if `path` exists, so two writers of one immutable version cannot both win.
    Without `make_parents` a missing folder is a `FileNotFoundError`, not made anew.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def with_version(data: bytes, version: int) -> bytes:
    """Package `data` (valid: read by `AdapterPackage.from_bytes`) with its manifest's version set to `version`:
    the header is written anew, padded to 8 bytes as safetensors writes it, and the tensors' bytes follow unchanged."""
    length = _header_length(data[:SNIFF_BYTES], len(data))
    header = _parse_header(data[:SNIFF_BYTES], data[8 : 8 + length])
    manifest = _manifest_from(header).model_copy(update={"version": version})
    header["__metadata__"][METADATA_KEY] = manifest.model_dump_json()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw, memoryview(data)[8 + length :]])  # one copy of the tensors


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
        """Write atomically (see `atomic_write`), replacing any file at `path`."""
        return atomic_write(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> AdapterPackage:
        """Parse and validate a package; raises `PackageFormatError` naming the problem."""
        if len(data) > MAX_PACKAGE_BYTES:
            raise PackageFormatError(f"package is {len(data)} bytes; the limit is {MAX_PACKAGE_BYTES}")
        length = _header_length(data[:SNIFF_BYTES], len(data))
        header = _parse_header(data[:SNIFF_BYTES], data[8 : 8 + length])
        _check_whole(data, length, header)
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises its own error type from Rust
            raise PackageFormatError(f"not a valid safetensors file: {exc}") from None
        manifest = _manifest_from(header)
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
