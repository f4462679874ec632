"""Offline conversions that stream: merged <-> per-expert HF checkpoints, HF <-> native DCP.

Nothing is loaded up front. The state dict handed to ``dcp.save`` holds meta tensors (shapes
and dtypes only); when the writer asks for a box of one, it is read from the source at that
moment, through the source layout. So a process holds only the boxes being written (one
expert's projection when splitting, one merged tensor when merging), and under ``torchrun``
the tensors are spread over the processes by size.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.storage import StorageReader

from dcp_hf.errors import CheckpointFormatError, on_every_rank
from dcp_hf.format import INDEX_NAME, TensorSpec
from dcp_hf.layouts import IDENTITY, Layout, Prefix, detect_layout, infer_style
from dcp_hf.layouts.models import MINDSPEED_MODELS, TRANSFORMERS_MOE, mindspeed_model, read_config
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.storage import HFStorageReader, HFStorageWriter
from dcp_hf.storage.stores import is_url, open_store
from dcp_hf.tensor_box import TensorBox


class StreamingSavePlanner(HFSavePlanner):
    """Save meta tensors whose data is read from ``source`` (through ``source_layout``) box by
    box, when the writer needs it."""

    def __init__(self, layout: Layout, source: StorageReader, source_layout: Layout):
        super().__init__(layout)
        self.source = source
        self.source_layout = source_layout
        self.source_metadata = source.read_metadata()
        source.set_up_storage_reader(self.source_metadata, True)

    def fetch(self, source: MetadataIndex, lo: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        value = self.state_dict[source.fqn]  # a meta tensor: shape and dtype only
        chunk_lo = tuple(source.offset) if source.offset is not None else (0,) * len(lo)
        out = torch.empty(size, dtype=value.dtype)
        box = TensorBox(out, [c + o for c, o in zip(chunk_lo, lo)], tuple(value.size()))
        planner = HFLoadPlanner(self.source_layout)
        planner.set_up_planner({source.fqn: box}, self.source_metadata, True)
        plan = planner.finish_plan(planner.create_local_plan())
        self.source.read_data(plan, planner).wait()
        return out


def hf_specs(reader: HFStorageReader) -> dict[str, TensorSpec]:
    reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))
    return {k: TensorSpec(k, e.dtype, e.shape) for h in reader.headers.values() for k, e in h.tensors.items()}


def dcp_specs(reader: StorageReader) -> tuple[dict[str, TensorSpec], list[str]]:
    md = reader.read_metadata()
    specs, skipped = {}, []
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            specs[key] = TensorSpec(key, entry.properties.dtype, tuple(entry.size))
        else:
            skipped.append(key)
    return specs, skipped


def _my_share(specs: dict[str, TensorSpec]) -> dict:
    """This rank's share of the tensors, as meta tensors (shapes and dtypes only): a tensor
    larger than a rank's fair share is split by rows over all ranks (a TensorBox each), the
    rest are dealt out whole by size, largest first, to the least loaded rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    fair = sum(s.nbytes for s in specs.values()) / world
    load = [0] * world
    mine = {}
    for spec in sorted(specs.values(), key=lambda s: (-s.nbytes, s.key)):
        if world > 1 and spec.nbytes > fair / 2 and spec.shape and spec.shape[0] >= world:
            rows = spec.shape[0]
            lo, hi = rows * rank // world, rows * (rank + 1) // world
            for r in range(world):
                load[r] += spec.nbytes * ((rows * (r + 1) // world) - (rows * r // world)) // rows
            local = torch.empty((hi - lo, *spec.shape[1:]), dtype=spec.dtype, device="meta")
            mine[spec.key] = TensorBox(local, (lo,) + (0,) * (len(spec.shape) - 1), spec.shape)
            continue
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += spec.nbytes
        if r == rank:
            mine[spec.key] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    return mine


def stream(specs: dict[str, TensorSpec], source: StorageReader, source_layout: Layout,
           writer, dest_layout: Layout) -> None:
    """Write ``specs`` (in-memory tensors) with ``writer`` through ``dest_layout``, reading each
    box from ``source`` through ``source_layout``."""
    planner = StreamingSavePlanner(dest_layout, source, source_layout)
    dcp.save(_my_share(specs), storage_writer=writer, planner=planner,
             no_dist=not dist.is_initialized())


def with_prefixes(layout: Layout, prefixes) -> Layout:
    """``layout`` plus prefix renames given as (memory prefix, HF prefix) pairs, outermost on
    the memory side: ``model.`` before Qwen3-Omni's merged names, as in MindSpeed-MM's DCP."""
    extra = tuple(Prefix(memory, hf) for memory, hf in prefixes)
    return Layout(layout.rules, extra + layout.renames, layout.strict, layout.name)


def _is_side_file(name: str) -> bool:
    return not (name.endswith(".safetensors") or name.startswith(".") or name == INDEX_NAME)


def copy_side_files(src: str, dst: str, recursive: bool = False) -> list[str]:
    """Copy what is not weights (config, tokenizer, processor, ...) from an HF folder: every
    file but ``*.safetensors``, the index and hidden names (``.git``, ``.cache``); with
    ``recursive``, also those in subfolders (as MindSpeed-MM's converters do)."""
    copied = []
    os.makedirs(dst, exist_ok=True)
    inside = os.path.realpath(dst)  # DST may lie in SRC: not copied into itself
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) != inside)
        rel = os.path.relpath(root, src)
        for name in sorted(files):
            if not _is_side_file(name):
                continue
            target = os.path.normpath(os.path.join(dst, rel, name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(root, name), target)
            copied.append(os.path.normpath(os.path.join(rel, name)))
    return copied


def read_side_files(src: str) -> dict[str, bytes]:
    """The top-level side files of an HF folder, local or at a URL (see ``copy_side_files``)."""
    store = open_store(src)
    return {name: store.read(name) for name in store.list() if _is_side_file(name) and store.exists(name)}


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def experts_layout(src: str, source: dict[str, TensorSpec], direction: str, style: str | None) -> Layout:
    """The layout between SRC's per-expert tensors (its HF side) and their merged form (its
    memory side), from SRC's config.json. A MindSpeed-MM model's merged checkpoint is its
    in-memory form, renames included (Qwen3-Omni's without ``thinker.``); for the others both
    sides keep the HF names. Under auto, ``split`` reads the form off the merged tensors'
    shapes, which for a MindSpeed-MM model must be the model's own."""
    config = read_config(src)
    model = mindspeed_model(config) if config else None
    inferred = infer_style(source) if direction == "split" else None
    if model is not None and style is None and inferred not in (None, model.style):
        raise CheckpointFormatError(
            f"{src}: the merged experts are in the {inferred!r} form, not MindSpeed-MM's "
            f"{model.style!r} form for a {model.config_class}; pass --layout {inferred} to split them")
    layout = detect_layout(src, style or (None if model else inferred))
    if not layout.rules:
        what = f"model type {config.get('model_type')!r}" if config else "no config.json"
        raise CheckpointFormatError(
            f"{src}: {what}: no known merged-experts form (known: {', '.join(MINDSPEED_MODELS)} as "
            f"MindSpeed-MM merges them, and transformers' MoE families {', '.join(TRANSFORMERS_MOE)}); "
            f"name the form with --layout transformers|mindspeed|flat")
    return layout if model else layout.without_renames()


@dataclass
class _Stream:
    """What ``stream`` gets: the tensors to write (in-memory keys), read through
    ``source_layout`` from ``reader``, written through ``dest_layout``."""

    reader: HFStorageReader
    specs: dict[str, TensorSpec]
    source_layout: Layout
    dest_layout: Layout
    layout: Layout  # the merged-experts layout in use
    tensors_in: int


def _experts_plan(direction: str, src: str, style: str | None) -> _Stream:
    """What ``experts`` writes, after every check that can refuse it."""
    reader = HFStorageReader(src)
    source = hf_specs(reader)
    layout = experts_layout(src, source, direction, style)
    rule = layout.rules[0]
    if direction == "merge":
        specs, outside = layout.memory_specs(source)
        if outside:
            raise CheckpointFormatError(
                f"{src}: {layout.name}'s merged form has no name for {sorted(outside)[:5]} "
                f"(only {', '.join(repr(p) for r in layout.renames for p in (r.hf, *r.keep))} keys)")
        if len(specs) == len(source):
            raise CheckpointFormatError(f"{src}: no per-expert tensors to merge ({layout.name}, {rule.style})")
        return _Stream(reader, specs, layout, IDENTITY, layout, len(source))
    if not rule.check_merged({layout.to_hf_key(k): s.shape for k, s in source.items()}):
        raise CheckpointFormatError(f"{src}: no merged expert tensors to split ({layout.name}, {rule.style})")
    written: dict[str, str] = {}
    for key, spec in source.items():  # no two tensors may land on one key
        for piece in layout.pieces(key, spec.shape):
            if written.setdefault(piece.hf_key, key) != key:
                raise CheckpointFormatError(
                    f"{src}: {key!r} and {written[piece.hf_key]!r} both split into {piece.hf_key!r}")
    return _Stream(reader, source, IDENTITY, layout, layout, len(source))


def experts(direction: str, src: str, dst: str, style: str | None = None, *, max_shard_size="5GB",
            overwrite=False, progress=False) -> dict:
    """``merge``: per-expert HF -> merged HF; ``split``: merged HF -> per-expert HF, as
    MindSpeed-MM's ``moe_expert --style merge|split`` does for its models (see
    ``experts_layout``). ``style`` (transformers, mindspeed, flat) overrides the merged form.
    Whatever the layout cannot map back and forth exactly is refused, on every rank, before
    anything is written; non-weight files are copied, subfolders included."""
    if direction not in ("merge", "split"):
        raise ValueError(f"direction must be merge or split, not {direction!r}")
    plan = on_every_rank(lambda: _experts_plan(direction, src, style))
    # Side files: between local folders copied after the weights, subfolders too; where either
    # side is a URL, SRC's top-level ones are written by the writer before its index.
    remote = is_url(src) or is_url(dst)
    side = on_every_rank(lambda: read_side_files(src) if remote and is_main() else {})
    writer = HFStorageWriter(dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                             side_files=side)
    stream(plan.specs, plan.reader, plan.source_layout, writer, plan.dest_layout)
    # on every rank: no rank returns (say, to read DST's config) before the copy is done
    copied = sorted(side) if remote else on_every_rank(
        lambda: copy_side_files(src, dst, recursive=True) if is_main() else [])
    return {"layout": f"{plan.layout.name}, {plan.layout.rules[0].style}", "tensors_in": plan.tensors_in,
            "copied": copied}


def hf_to_dcp(src: str, dst: str, layout: Layout | None = None, *, style: str | None = None,
              prefixes=(), progress=False) -> dict:
    """An HF checkpoint -> a native DCP checkpoint (``FileSystemWriter`` format) whose keys are
    the in-memory keys of ``layout`` (default: from SRC's config.json and ``style``, plus
    ``prefixes``)."""
    layout = layout or with_prefixes(detect_layout(src, style), prefixes)
    reader = HFStorageReader(src)
    specs, outside = layout.memory_specs(hf_specs(reader))
    stream(specs, reader, layout, dcp.FileSystemWriter(dst), IDENTITY)
    return {"tensors": len(specs), "outside_layout": outside}


def dcp_to_hf(src: str, dst: str, layout: Layout | None = None, *, config_from: str | None = None,
              prefixes=(), max_shard_size="5GB", overwrite=False, progress=False) -> dict:
    """A native DCP checkpoint -> an HF checkpoint, through ``layout`` (default: from
    ``config_from``'s config.json, with the merged form read off the DCP tensors' shapes)."""
    reader = dcp.FileSystemReader(src)
    specs, skipped = dcp_specs(reader)
    if layout is None:
        layout = with_prefixes(detect_layout(config_from or "", infer_style(specs)), prefixes)
    writer = HFStorageWriter(dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
    stream(specs, reader, IDENTITY, writer, layout)
    copied = copy_side_files(config_from, dst) if config_from and is_main() else []
    return {"tensors": len(specs), "skipped_non_tensors": skipped, "copied": copied}
