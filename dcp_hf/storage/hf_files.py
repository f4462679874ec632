"""What makes a DCP save of a transformers model a folder ``from_pretrained`` loads as is:
config.json (and the generation config, tokenizer and processor files of a source folder),
tied weights left out as ``save_pretrained`` leaves them out, and a source checkpoint's
key -> file map kept (torch's ``fqn_to_index_mapping``, or an index json), for
:class:`~dcp_hf.storage.writer.HFStorageWriter`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

from dcp_hf.contract import tensor_data
from dcp_hf.errors import CheckpointFormatError, StateDictMismatchError
from dcp_hf.format import INDEX_NAME, SINGLE_FILE_NAME, FileLayout, TensorSpec, decode_index, natural_key
from dcp_hf.format.index import FILE_PATTERN, lay_out_file, layout_files

CONFIG_NAME = "config.json"
# Weights in any format, and what only describes them: not side files (unless other_weights).
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".index.json",
    ".distcp",
)


def parse_config(data: bytes | str, where: str) -> dict:
    """A config.json's text as a dict, or an error naming ``where`` (the file or URL)."""
    try:
        value = json.loads(data)
    except ValueError as e:
        raise CheckpointFormatError(f"{where}: not a valid config.json: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{where}: not a valid config.json: not a JSON object")
    return value


def config_dict(config) -> dict:
    """A config as a dict: a dict, a transformers ``PretrainedConfig``, a config.json path or
    an HF folder holding one. The one reader of local config files: errors name the file."""
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config.json (config=)") from None
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read the config: {e.strerror}") from None
    return parse_config(data, path)


def ties_embeddings(config: dict) -> bool:
    """Whether the config ties the output embedding to the input one (also a VLM's text part)."""
    text = config.get("text_config")
    return bool(config.get("tie_word_embeddings")) or (isinstance(text, dict) and bool(text.get("tie_word_embeddings")))


def tied_source(key: str, keys) -> str | None:
    """The input embedding an output embedding ``key`` is tied to: the one key ending in
    ``embed_tokens.weight`` (``model.`` or ``model.language_model.`` prefixed), or None."""
    if not key.endswith("lm_head.weight"):
        return None
    sources = [k for k in keys if k.endswith("embed_tokens.weight")]
    if len(sources) != 1:
        raise StateDictMismatchError(
            f"config.json ties {key!r} to the input embedding, but the state dict has "
            f"{len(sources)} '*embed_tokens.weight' tensors ({sources[:3]}); save with "
            f"tie_word_embeddings false in the config"
        )
    return sources[0]


def is_side_file(name: str, other_weights: bool = False) -> bool:
    """Whether a file of an HF folder goes beside weights written anew: not hidden (``.git``
    and ``.cache`` folders can hold whole LFS copies of the weights), not the safetensors
    weights or their index, and not weights in another format (``.bin``, ``.pt``, ``.gguf``,
    ...) unless ``other_weights`` (MindSpeed-MM's converters leave out only ``*.safetensors``)."""
    if name.startswith("."):
        return False
    if other_weights:
        return not (name.endswith(".safetensors") or name == INDEX_NAME)
    return not name.endswith(_WEIGHT_SUFFIXES)


def side_files_of(folder: str, *, other_weights: bool = False, recursive: bool = False) -> list[str]:
    """The side files of an HF folder, local or at a URL (see :func:`is_side_file`): config,
    generation config, tokenizer, processor, chat template, remote code... as relative names;
    with ``recursive``, those in subfolders too (local folders only), hidden folders left out."""
    from dcp_hf.storage.stores import is_url, open_store

    if is_url(folder):
        store = open_store(folder)
        return [n for n in store.list() if is_side_file(n, other_weights) and store.exists(n)]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith("."))
        rel = os.path.relpath(root, folder)
        names += [
            os.path.normpath(os.path.join(rel, n))
            for n in files
            if is_side_file(n, other_weights) and os.path.isfile(os.path.join(root, n))
        ]
    return sorted(names)


def read_side_files(folder: str, *, other_weights: bool = False) -> dict[str, bytes]:
    """The top-level side files of an HF folder, local or at a URL: name -> bytes."""
    from dcp_hf.storage.stores import open_store

    store = open_store(folder)
    return {name: store.read(name) for name in side_files_of(folder, other_weights=other_weights)}


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy what MindSpeed-MM's converters copy from a local HF folder, subfolders included:
    every file but ``*.safetensors`` (``is_side_file(other_weights=True)``), less the index and
    hidden names; returns the names copied."""
    inside = os.path.realpath(dst) + os.sep  # DST may lie in SRC: not copied into itself
    copied = [
        n
        for n in side_files_of(src, other_weights=True, recursive=True)
        if not os.path.realpath(os.path.join(src, n)).startswith(inside)
    ]
    for name in copied:
        target = os.path.join(dst, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(src, name), target)
    return copied


def read_file_map(source) -> dict[str, str]:
    """key -> file name of an existing checkpoint: an index json, or any HF checkpoint folder
    (or URL) as HFStorageReader reads it."""
    from dcp_hf.storage.reader import HFStorageReader
    from dcp_hf.storage.stores import open_store

    path = os.fspath(source)
    try:
        if path.endswith(".json"):
            store, name = open_store(os.path.dirname(path) or "."), os.path.basename(path)
            return decode_index(store.read(name), path)
        reader = HFStorageReader(path)
        reader.read_metadata()
        return reader.weight_map
    except FileNotFoundError as e:
        raise FileNotFoundError(f"file_map_from={path!r}: {e}") from None


@dataclasses.dataclass
class HFFiles:
    """The writer's HF-folder options. ``groups``: key -> file number (0-based, in the source's
    file order), from ``file_map_from`` or torch's ``fqn_to_index_mapping``."""

    config: dict | None = None
    copy_from: str | None = None
    groups: dict[str, int] | None = None

    @classmethod
    def from_options(
        cls, config=None, copy_from=None, file_map_from=None, fqn_to_index_mapping: dict[str, int] | None = None
    ) -> "HFFiles":
        if file_map_from is not None and fqn_to_index_mapping is not None:
            raise ValueError("give file_map_from or fqn_to_index_mapping, not both")
        copy_from = os.fspath(copy_from) if copy_from is not None else None
        if copy_from is not None:
            try:
                side_files_of(copy_from)  # fail now, on every rank, not at commit
            except FileNotFoundError as e:
                raise FileNotFoundError(f"copy_from={copy_from!r}: {e}") from None
        if config is None and copy_from is not None and os.path.exists(os.path.join(copy_from, CONFIG_NAME)):
            config = os.path.join(copy_from, CONFIG_NAME)
        groups = None
        if file_map_from is not None:
            file_map = read_file_map(file_map_from)
            order = {name: n for n, name in enumerate(sorted(set(file_map.values()), key=natural_key))}
            groups = {key: order[name] for key, name in file_map.items()}
        elif fqn_to_index_mapping is not None:
            groups = {key: int(index) - 1 for key, index in fqn_to_index_mapping.items()}
        return cls(config_dict(config) if config is not None else None, copy_from, groups)

    # -- tied weights -------------------------------------------------------------------------
    def tied(self, keys) -> dict[str, str]:
        """Keys to leave out -> the key they are tied to, as ``save_pretrained`` does when the
        config ties the embeddings."""
        if self.config is None or not ties_embeddings(self.config):
            return {}
        keys = list(keys)
        return {key: source for key in keys if (source := tied_source(key, keys)) is not None}

    def drop_tied(self, plan: SavePlan, planner: SavePlanner, kept) -> SavePlan:
        """This rank's plan without the boxes of tied keys (those not in ``kept``), each checked
        to equal the same box of the tensor it is tied to, which this rank also writes."""
        dropped = [i for i in plan.items if i.index.fqn not in kept]
        if not dropped:
            return plan
        tied = self.tied([*kept, *{i.index.fqn for i in dropped}])
        mine = {}
        for i in plan.items:
            box = tensor_data(i).chunk
            mine[i.index.fqn, tuple(box.offsets), tuple(box.sizes)] = i
        for item in dropped:
            key, chunk = item.index.fqn, tensor_data(item).chunk
            source = tied.get(key)
            if source is None:
                raise StateDictMismatchError(f"{key!r} is not in the checkpoint's table")
            twin = mine.get((source, tuple(chunk.offsets), tuple(chunk.sizes)))
            if twin is None:
                raise StateDictMismatchError(
                    f"{key!r} is tied to {source!r} by config.json (tie_word_embeddings), but this "
                    f"rank writes its box at {list(chunk.offsets)} without the same box of {source!r}, "
                    f"so their equality cannot be checked; save them sharded alike, or with "
                    f"tie_word_embeddings false in the config"
                )
            a, b = planner.resolve_data(item), planner.resolve_data(twin)
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)  # tensors (shard items)
            if not (a.shape == b.shape and torch.equal(a.to(b.dtype), b)):
                raise StateDictMismatchError(
                    f"{key!r} differs from {source!r} at {list(chunk.offsets)}, but config.json ties "
                    f"them (tie_word_embeddings): the saved model would not be this one; save with "
                    f"tie_word_embeddings false in the config"
                )
        return dataclasses.replace(plan, items=[i for i in plan.items if i.index.fqn in kept])

    # -- files --------------------------------------------------------------------------------
    def lay_out(self, specs: list[TensorSpec], max_shard_size: int, save_id: str) -> list[FileLayout]:
        """The files: huggingface_hub's grouping, or the source's file map with new keys grouped
        after it. Files are numbered ``model-0000K-of-0000N`` in that order (the source's names
        when it used the standard ones and no key is new), empty groups dropped."""
        if self.groups is None:
            return layout_files(specs, max_shard_size, save_id)
        known: dict[int, list[TensorSpec]] = {}
        new = []
        for spec in specs:
            if spec.key in self.groups:
                known.setdefault(self.groups[spec.key], []).append(spec)
            else:
                new.append(spec)
        groups = [known[n] for n in sorted(known)]
        if new:
            groups += [list(f.specs.values()) for f in layout_files(new, max_shard_size)]
        if len(groups) == 1:
            return [lay_out_file(SINGLE_FILE_NAME, groups[0], save_id)]
        total = len(groups)
        return [
            lay_out_file(FILE_PATTERN.format(suffix=f"-{n + 1:05d}-of-{total:05d}"), group, save_id)
            for n, group in enumerate(groups)
        ]

    def side_files(self) -> dict[str, bytes]:
        """config.json and the files of ``copy_from`` (read on the coordinator at plan time)."""
        out = read_side_files(self.copy_from) if self.copy_from is not None else {}
        if self.config is not None:
            out[CONFIG_NAME] = (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode()
        return out
