"""Offline conversions that stream: merged <-> per-expert HF checkpoints, HF <-> native DCP.

Nothing is loaded up front. The state dict handed to ``dcp.save`` holds meta tensors (shapes
and dtypes only); when the writer asks for a box of one, it is read from the source at that
moment, through the source layout. So a process holds only the boxes being written (one
expert's projection when splitting, one merged tensor when merging), and under ``torchrun``
the tensors are spread over the processes by size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.storage import StorageReader

from dcp_hf.format import INDEX_NAME, TensorSpec
from dcp_hf.layouts import IDENTITY, Layout, Prefix, detect_layout, infer_style
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.progress import file_system_writer
from dcp_hf.storage import HFStorageReader, HFStorageWriter
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
    """``layout`` plus prefix renames given as (memory prefix, HF prefix) pairs."""
    extra = tuple(Prefix(memory, hf) for memory, hf in prefixes)
    return dataclasses.replace(layout, renames=layout.renames + extra)


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy what is not weights (config, tokenizer, ...) from an HF folder."""
    copied = []
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (name.endswith(".safetensors") or name == INDEX_NAME or name.startswith(".")
                or not os.path.isfile(path)):
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def experts(direction: str, src: str, dst: str, style: str | None = None, *, max_shard_size="5GB",
            overwrite=False, progress=False) -> dict:
    """``merge``: per-expert HF -> merged HF; ``split``: merged HF -> per-expert HF. The layout
    comes from SRC's config.json; ``style`` (transformers, mindspeed, flat) overrides its merged
    form, which ``split`` otherwise reads off the merged tensors' shapes. Both sides are HF
    checkpoints, so the layout's renames do not apply."""
    reader = HFStorageReader(src)
    source = hf_specs(reader)
    if style is None and direction == "split":
        style = infer_style(source)
    rules = detect_layout(src, style).without_renames()
    if not rules.rules:
        raise ValueError(f"{src}: no merged-experts layout (no config.json of a known MoE family); "
                         f"name the style: transformers, mindspeed or flat")
    writer = HFStorageWriter(dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
    if direction == "merge":
        specs, _ = rules.memory_specs(source)
        stream(specs, reader, rules, writer, IDENTITY)
    elif direction == "split":
        stream(source, reader, IDENTITY, writer, rules)
    else:
        raise ValueError(f"direction must be merge or split, not {direction!r}")
    copied = copy_side_files(src, dst) if is_main() else []
    return {"layout": f"{rules.name}, {rules.rules[0].style}", "tensors_in": len(source), "copied": copied}


def hf_to_dcp(src: str, dst: str, layout: Layout | None = None, *, style: str | None = None,
              prefixes=(), progress=False) -> dict:
    """An HF checkpoint -> a native DCP checkpoint (``FileSystemWriter`` format) whose keys are
    the in-memory keys of ``layout`` (default: from SRC's config.json and ``style``, plus
    ``prefixes``)."""
    layout = layout or with_prefixes(detect_layout(src, style), prefixes)
    reader = HFStorageReader(src)
    specs, outside = layout.memory_specs(hf_specs(reader))
    stream(specs, reader, layout, file_system_writer(dst, progress=progress), IDENTITY)
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


def dequantize(src: str, dst: str, dtype: torch.dtype = torch.bfloat16, *, max_shard_size="5GB",
               overwrite=False, progress=False) -> dict:
    """A quantized HF checkpoint (FP8 block-scaled, MXFP4; from its config.json) -> the same
    checkpoint in ``dtype``, streaming: each process reads and dequantizes only the boxes it
    writes (under ``torchrun`` the tensors are spread over the processes). Keys stay the HF
    keys (GPT-OSS experts take transformers' orientation, as its bf16 checkpoints do); the
    config.json written beside them has no ``quantization_config``."""
    from dcp_hf.layouts.quantized import SwapLastDims
    found = detect_layout(src)
    if found.quantization is None:
        raise ValueError(f"{src}: config.json has no quantization_config; nothing to dequantize")
    layout = Layout(tuple(r for r in found.rules if isinstance(r, SwapLastDims)),
                    quantization=dataclasses.replace(found.quantization, logical_dtype=dtype),
                    name=found.name)
    reader = HFStorageReader(src)
    source = hf_specs(reader)
    specs, _ = layout.memory_specs(source)
    writer = HFStorageWriter(dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
    stream(specs, reader, layout, writer, IDENTITY)
    copied = copy_side_files(src, dst) if is_main() else []
    if is_main() and "config.json" in copied:
        with open(os.path.join(dst, "config.json")) as f:
            config = json.load(f)
        config.pop("quantization_config", None)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return {"layout": layout.name, "tensors_in": len(source), "tensors_out": len(specs),
            "dequantized": len(source) - len(specs), "copied": copied}
