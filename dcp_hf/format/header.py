"""safetensors headers: encode, and decode with full validation.

File layout: 8-byte little-endian header length N, N bytes of JSON, then the data region.
Every tensor's ``data_offsets`` are relative to the data region and must tile it exactly.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from dcp_hf.errors import CheckpointFormatError, StateDictMismatchError
from dcp_hf.format.dtypes import dtype_from_name, itemsize, name_from_dtype

# The limit the safetensors reference implementation enforces.
MAX_HEADER_SIZE = 100_000_000
# One read that usually holds the whole header, so remote files need a single request.
SPECULATIVE_HEADER_READ = 1 << 16
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (offsets absolute, in bytes)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileHeader:
    file: str
    data_start: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None


def encode_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]], metadata: dict[str, str] | None = None
) -> bytes:
    """Header bytes (length prefix included) for entries (name, dtype, shape, begin, end),
    with begin/end relative to the data region. Padded with spaces so data starts 8-aligned."""
    header: dict[str, object] = {METADATA_KEY: dict(metadata or {"format": "pt"})}
    for name, dtype, shape, begin, end in entries:
        if name == METADATA_KEY:
            raise StateDictMismatchError(
                f"tensor {name!r}: the name is reserved by safetensors for the file's metadata; rename the tensor"
            )
        header[name] = {"dtype": name_from_dtype(dtype, key=name), "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def header_length(prefix: bytes, file: str, file_size: int) -> int:
    """Validate the 8-byte length prefix of a file of ``file_size`` bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointFormatError(f"{file}: truncated safetensors file ({file_size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_SIZE:
        raise CheckpointFormatError(
            f"{file}: header length {n} exceeds the safetensors limit of {MAX_HEADER_SIZE} bytes"
        )
    if 8 + n > file_size:
        raise CheckpointFormatError(
            f"{file}: header length {n} is larger than the file ({file_size} bytes); truncated?"
        )
    return n


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointFormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _int(value, what: str, file: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointFormatError(f"{file}: tensor {key!r}: {what} must be an integer, got {value!r}")
    if value < 0:
        raise CheckpointFormatError(f"{file}: tensor {key!r}: {what} is negative ({value})")
    return value


def decode_header(body: bytes, file: str, file_size: int) -> FileHeader:
    """Parse and validate the JSON header ``body`` (without the length prefix)."""
    data_start = 8 + len(body)
    try:
        raw = json.loads(body.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{file}: header has a {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{file}: header is not a JSON object")
    metadata = raw.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointFormatError(f"{file}: {METADATA_KEY} must map strings to strings")

    tensors: dict[str, TensorEntry] = {}
    for key, info in raw.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointFormatError(
                f"{file}: tensor {key!r}: expected exactly dtype, shape and data_offsets, got {info!r:.200}"
            )
        dtype = dtype_from_name(info["dtype"], where=f"{file}: tensor {key!r}: ")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list):
            raise CheckpointFormatError(f"{file}: tensor {key!r}: shape must be a list, got {shape!r:.100}")
        dims = tuple(_int(d, "shape", file, key) for d in shape)
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise CheckpointFormatError(f"{file}: tensor {key!r}: data_offsets must be [begin, end]")
        begin, end = (_int(o, "data_offsets", file, key) for o in offsets)
        expected = math.prod(dims) * itemsize(dtype)
        if end < begin or end - begin != expected:
            raise CheckpointFormatError(
                f"{file}: tensor {key!r}: data_offsets {offsets} hold {end - begin} bytes, "
                f"shape {list(dims)} x {info['dtype']} needs {expected}"
            )
        tensors[key] = TensorEntry(key, dtype, dims, data_start + begin, data_start + end)

    _check_tiling(tensors, file, data_start, file_size)
    return FileHeader(file, data_start, file_size, tensors, metadata)


def _check_tiling(tensors: dict[str, TensorEntry], file: str, data_start: int, file_size: int):
    """Offsets must cover the data region exactly once: no gap, no overlap, no trailing bytes."""
    pos, prev = data_start, None
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start > pos:
            raise CheckpointFormatError(
                f"{file}: gap of {t.start - pos} bytes before tensor {t.name!r} in the data region"
            )
        if t.start < pos:
            raise CheckpointFormatError(f"{file}: tensor {t.name!r} overlaps tensor {prev!r}")
        pos, prev = t.end, t.name
    if pos < file_size:
        raise CheckpointFormatError(f"{file}: {file_size - pos} trailing bytes after the last tensor")
    if pos > file_size:
        raise CheckpointFormatError(
            f"{file}: data region ends at byte {pos} but the file has {file_size} bytes; truncated?"
        )


def read_header(read_range: Callable[[int, int], bytes], file: str, file_size: int) -> FileHeader:
    """Read and validate a header with ``read_range(offset, length)``: one speculative read,
    a second only when the header is larger than it."""
    first = read_range(0, min(file_size, SPECULATIVE_HEADER_READ))
    n = header_length(first, file, file_size)
    body = first[8 : 8 + n]
    if len(body) < n:
        body += read_range(len(first), 8 + n - len(first))
    if len(body) != n:
        raise CheckpointFormatError(f"{file}: truncated header")
    return decode_header(body, file, file_size)
