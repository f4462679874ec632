"""HF checkpoint naming, the index json, and grouping tensors into files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from dcp_hf.errors import CheckpointFormatError
from dcp_hf.format.dtypes import itemsize
from dcp_hf.format.header import encode_header

INDEX_NAME = "model.safetensors.index.json"
# The id of the save that wrote a file: in every file's ``__metadata__`` and in the index's
# ``metadata``, so a reader can refuse files of two different saves (a racing overwrite or an
# interrupted commit on an object store) instead of loading a mix.
SAVE_ID_KEY = "dcp_hf_save_id"
SINGLE_FILE_NAME = "model.safetensors"
FILE_PATTERN = "model{suffix}.safetensors"
# In a training checkpoint's model index: the name of its training state's index (committed with
# the model's: one rename of the model index commits both).
TRAINING_STATE_INDEX_KEY = "dcp_hf_training_state_index"
# A checkpoint's own files in a folder, HF's or torch's FileSystemWriter's: a save replaces them
# (with overwrite) and keeps every other file (config, tokenizer, the user's notes). A file whose
# standard name the previous checkpoint still uses gets the save's id in its name (``fresh_name``).
CHECKPOINT_FILE = re.compile(
    r"^((model|training_state)(-\d{5}-of-\d{5})?(-[0-9a-f]{12})?\.safetensors"
    r"|(model|training_state)(-[0-9a-f]{12})?\.safetensors\.index\.json"
    r"|__\d+_\d+\.distcp|\.metadata)$"
)


def fresh_name(name: str, save_id: str) -> str:
    """``name`` with the save's id before its ``.safetensors``: a name no earlier save used, so
    a save never rewrites a file the previous checkpoint's index names, while that index is in
    place (``model-00001-of-00002.safetensors`` -> ``model-00001-of-00002-SAVEID.safetensors``)."""
    stem, dot, rest = name.partition(".safetensors")
    return f"{stem}-{save_id}{dot}{rest}"


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10**9, as huggingface_hub) or "512MiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or 4GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def check_file_name(name: object, where: str) -> str:
    """A file named by an index must be a plain file name inside the checkpoint folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or ":" in name
        or "\x00" in name
    ):
        raise CheckpointFormatError(f"{where}: file name {name!r} is not a plain file name inside the checkpoint")
    return name


def encode_index(
    total_size: int,
    weight_map: dict[str, str],
    save_id: str | None = None,
    training_state_index: str | None = None,
    digests: dict | None = None,
) -> bytes:
    """An index json; ``digests`` (file -> FileDigest) are the files' block digests."""
    metadata: dict[str, object] = {"total_size": total_size}
    if save_id is not None:
        metadata[SAVE_ID_KEY] = save_id
    if training_state_index is not None:
        metadata[TRAINING_STATE_INDEX_KEY] = training_state_index
    if digests:
        from dcp_hf.format.digests import DIGESTS_KEY, encode_digests

        metadata[DIGESTS_KEY] = encode_digests(digests)
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode("utf-8")


def decode_index(data: bytes, where: str) -> dict[str, str]:
    """The weight map of an index json, validated (key -> file name)."""
    return decode_index_and_id(data, where)[0]


def decode_index_and_id(data: bytes, where: str) -> tuple[dict[str, str], str | None]:
    """The weight map of an index json, validated (key -> file name), and the id of the save
    that wrote it (None for checkpoints written by other tools)."""
    index = decode_index_record(data, where)
    return index.weight_map, index.save_id


@dataclass(frozen=True)
class IndexRecord:
    """An index json: its weight map, the save that wrote it (None: another tool), in a
    training checkpoint's model index the name of the training state's index, and the files'
    recorded block digests (file -> FileDigest; none for other tools and older versions)."""

    weight_map: dict[str, str]
    save_id: str | None
    training_state_index: str | None
    digests: dict


def decode_index_record(data: bytes, where: str) -> IndexRecord:
    from dcp_hf.format.digests import decode_digests

    try:
        index = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{where}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{where}: no 'weight_map' object")
    for key, file in weight_map.items():
        check_file_name(file, f"{where}: key {key!r}")
    metadata = index.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    save_id, state_index = metadata.get(SAVE_ID_KEY), metadata.get(TRAINING_STATE_INDEX_KEY)
    if save_id is not None and not isinstance(save_id, str):
        raise CheckpointFormatError(f"{where}: metadata {SAVE_ID_KEY!r} must be a string")
    if state_index is not None:
        check_file_name(state_index, f"{where}: metadata {TRAINING_STATE_INDEX_KEY!r}")
    return IndexRecord(weight_map, save_id, state_index, decode_digests(metadata, where))


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(key: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``: text and numbers alternate, so
    equal positions always compare alike; the key itself breaks ties (``2`` vs ``02``)."""
    parts = _DIGITS.split(key)
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts), key


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class FileLayout:
    """One output file, fully decided before any byte is written."""

    name: str
    header: bytes  # length prefix included
    size: int
    offsets: dict[str, int]  # key -> absolute byte offset of its data in the file
    specs: dict[str, TensorSpec]


def layout_files(
    specs: list[TensorSpec], max_shard_size: int, save_id: str | None = None, filename_pattern: str = FILE_PATTERN
) -> list[FileLayout]:
    """Group tensors into files exactly as huggingface_hub does (greedy, in order, under
    ``max_shard_size``) and lay out each file. ``save_id`` goes in every header's
    ``__metadata__``."""
    by_key = {s.key: s for s in specs}
    split = split_state_dict_into_shards_factory(
        by_key,
        get_storage_size=lambda s: s.nbytes,
        get_storage_id=lambda s: None,
        filename_pattern=filename_pattern,
        max_shard_size=max_shard_size,
    )
    return [lay_out_file(name, [by_key[k] for k in keys], save_id) for name, keys in split.filename_to_tensors.items()]


def lay_out_file(name: str, specs: list[TensorSpec], save_id: str | None = None) -> FileLayout:
    """One file's header and offsets. Tensors are ordered by descending item size so every
    tensor's data is aligned to its dtype; ``save_id`` goes in the header's ``__metadata__``."""
    ordered = sorted(specs, key=lambda s: -itemsize(s.dtype))
    entries, pos = [], 0
    for s in ordered:
        entries.append((s.key, s.dtype, s.shape, pos, pos + s.nbytes))
        pos += s.nbytes
    header = encode_header(entries, None if save_id is None else {"format": "pt", SAVE_ID_KEY: save_id})
    offsets = {key: len(header) + begin for key, _, _, begin, _ in entries}
    return FileLayout(name, header, len(header) + pos, offsets, {s.key: s for s in ordered})
