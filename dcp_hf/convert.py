"""Offline conversions: merged <-> per-expert HF checkpoints, HF <-> native DCP, quantized ->
dequantized. Each checks everything that can refuse it first, then streams through
:mod:`dcp_hf.streaming` (a process holds a few stripes of the source and the boxes being written:
an expert's matrices when splitting, one merged tensor when merging).
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dcp_hf.errors import CheckpointExistsError, CheckpointFormatError, on_every_rank, root_cause
from dcp_hf.format import TensorSpec
from dcp_hf.layouts import IDENTITY, Layout, MergedExperts, Prefix, detect_layout, infer_style
from dcp_hf.layouts.models import MINDSPEED_MODELS, TRANSFORMERS_MOE, mindspeed_model, read_config
from dcp_hf.progress import file_system_writer
from dcp_hf.storage import HFStorageReader, HFStorageWriter, commit
from dcp_hf.storage.hf_files import copy_side_files, read_side_files
from dcp_hf.storage.stores import is_url, open_store
from dcp_hf.streaming import dcp_specs, hf_specs, is_main, stream


def with_prefixes(layout: Layout, prefixes) -> Layout:
    """``layout`` plus prefix renames given as (memory prefix, HF prefix) pairs, outermost on
    the memory side: ``model.`` before Qwen3-Omni's merged names, as in MindSpeed-MM's DCP.
    Keys without a prefix keep their names (an HF ``lm_head.weight`` beside ``model.*``)."""
    extra = tuple(dataclasses.replace(Prefix(memory, hf), others_kept=True) for memory, hf in prefixes)
    return dataclasses.replace(layout, renames=extra + layout.renames)


def _check_converted(src: str, specs: dict, source_keys, prefixes, side: str) -> None:
    """Refuse a conversion that would write no tensor, or whose ``--prefix`` matches no key of
    SRC (``side``: which half of MEM=HF SRC's keys carry): a mistyped prefix would otherwise
    copy the checkpoint unchanged."""
    if not specs:
        raise CheckpointFormatError(f"{src}: no tensors to convert; not writing an empty checkpoint")
    for memory, hf in prefixes:
        wanted = hf if side == "hf" else memory
        if wanted and not any(k.startswith(wanted) for k in source_keys):
            raise CheckpointFormatError(
                f"{src}: --prefix {memory}={hf}: no key starts with {wanted!r} "
                f"(keys: {', '.join(sorted(source_keys)[:3])}, ...)"
            )


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
            f"{model.style!r} form for a {model.config_class}; pass --layout {inferred} to split them"
        )
    layout = detect_layout(src, style or (None if model else inferred))
    if not layout.rules:
        what = f"model type {config.get('model_type')!r}" if config else "no config.json"
        raise CheckpointFormatError(
            f"{src}: {what}: no known merged-experts form (known: {', '.join(MINDSPEED_MODELS)} as "
            f"MindSpeed-MM merges them, and transformers' MoE families {', '.join(TRANSFORMERS_MOE)}); "
            f"name the form with --layout transformers|mindspeed|flat"
        )
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
                f"(only {', '.join(repr(p) for r in layout.renames for p in (r.hf, *r.keep))} keys)"
            )
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
                    f"{src}: {key!r} and {written[piece.hf_key]!r} both split into {piece.hf_key!r}"
                )
    return _Stream(reader, source, IDENTITY, layout, layout, len(source))


def experts(
    direction: str,
    src: str,
    dst: str,
    style: str | None = None,
    *,
    max_shard_size="5GB",
    overwrite=False,
    progress=False,
    stripe_bytes: int = 16 << 20,
) -> dict:
    """``merge``: per-expert HF -> merged HF; ``split``: merged HF -> per-expert HF, as
    MindSpeed-MM's ``moe_expert --style merge|split`` does for its models (see
    ``experts_layout``). ``style`` (transformers, mindspeed, flat) overrides the merged form.
    Whatever the layout cannot map back and forth exactly is refused, on every rank, before
    anything is written; non-weight files are copied, subfolders included. ``stripe_bytes``: the
    unit of reading the source (see ``StreamingSavePlanner``); a process holds about twice it."""
    if direction not in ("merge", "split"):
        raise ValueError(f"direction must be merge or split, not {direction!r}")
    plan = on_every_rank(lambda: _experts_plan(direction, src, style))
    # Side files: between local folders copied after the weights, subfolders too; where either
    # side is a URL, SRC's top-level ones are written by the writer before its index.
    remote = is_url(src) or is_url(dst)
    side = on_every_rank(lambda: read_side_files(src, other_weights=True) if remote and is_main() else {})
    writer = HFStorageWriter(
        dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, side_files=side
    )
    stream(plan.specs, plan.reader, plan.source_layout, writer, plan.dest_layout, stripe_bytes)
    # on every rank: no rank returns (say, to read DST's config) before the copy is done
    copied = sorted(side) if remote else on_every_rank(lambda: copy_side_files(src, dst) if is_main() else [])
    return {
        "layout": f"{plan.layout.name}, {plan.layout.rules[0].style}",
        "tensors_in": plan.tensors_in,
        "copied": copied,
    }


def _whole_or_absent(dst: str, write) -> None:
    """``write(folder)`` on every rank into a hidden sibling of DST, then moved into place
    (the HF writer's commit: the lock, the staging folder, the exchange with an old DST, whose
    other files are carried over) only if every rank succeeded; otherwise removed, DST as it
    was. Every rank raises the reason."""
    save_id = secrets.token_hex(6)

    def begin():
        if not is_main():
            return None
        lock = commit.acquire_lock(dst, save_id)
        try:
            commit.clean_leftovers(dst)
            return lock, commit.prepare(dst, save_id)
        except BaseException:
            commit.release_lock(lock, save_id)
            raise

    lock, dest = on_every_rank(begin) or (None, None)
    shared = [save_id, dest]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    save_id, work = shared[0], shared[1].work

    def run():
        try:
            write(work)
        except BaseException as e:  # DCP's CheckpointException: every rank raises the reason
            cause = root_cause(e)
            if cause is e:
                raise
            raise cause from None

    try:
        on_every_rank(run)
        on_every_rank(lambda: commit.commit(dest, save_id) if is_main() and dest.staged else None)
    except BaseException:
        if is_main():
            try:
                commit.clean_leftovers(dst)  # the marked staging folder
            finally:
                commit.release_lock(lock, save_id)
        raise
    if is_main():
        commit.release_lock(lock, save_id)


def _source_layout(src: str, layout: Layout, source: dict[str, TensorSpec]) -> Layout:
    """How ``hf_to_dcp`` reads SRC: through ``layout``, or, where SRC's experts are stored
    merged already (``experts merge``'s output) in the form the layout merges them into, through
    the layout less its merging rules: the merged tensors are the in-memory ones. A merged form
    other than the layout's, or a MindSpeed-MM model's (its merged names are the in-memory
    names), is refused with the way out."""
    rules = [r for r in layout.rules if isinstance(r, MergedExperts)]
    found = infer_style(source)
    if not rules or found is None:
        return layout
    config = read_config(src)
    style = rules[0].style
    split = f"run `dcp-hf experts split {src} SPLIT` first and convert SPLIT"
    if config and mindspeed_model(config) is not None:
        raise CheckpointFormatError(f"{src}: its experts are stored merged ({found} form); {split}")
    if {r.style for r in rules} != {found}:
        raise CheckpointFormatError(
            f"{src}: its experts are stored merged in the {found!r} form, not the {style!r} form of "
            f"layout {layout.name!r}; {split}, or pass --layout {found}"
        )
    if len(layout.memory_specs(source)[0]) != len(source):
        raise CheckpointFormatError(f"{src}: holds experts both merged and per expert; {split}")
    for rule in rules:  # every merged pair complete and consistent
        rule.check_merged({layout.to_hf_key(k): s.shape for k, s in source.items()})
    return dataclasses.replace(layout, rules=tuple(r for r in layout.rules if not isinstance(r, MergedExperts)))


def hf_to_dcp(
    src: str, dst: str, layout: Layout | None = None, *, style: str | None = None, prefixes=(), progress=False
) -> dict:
    """An HF checkpoint -> a native DCP checkpoint (``FileSystemWriter`` format) whose keys are
    the in-memory keys of ``layout`` (default: from SRC's config.json and ``style``, plus
    ``prefixes``)."""
    layout = layout or with_prefixes(detect_layout(src, style), prefixes)
    reader = HFStorageReader(src)
    source = hf_specs(reader)
    layout = _source_layout(src, layout, source)
    specs, outside = layout.memory_specs(source)
    _check_converted(src, specs, source, prefixes, "hf")
    if outside:  # e.g. a Qwen3-Omni key outside thinker./talker./code2wav.
        raise CheckpointFormatError(
            f"{src}: layout {layout.name!r} has no in-memory name for {sorted(outside)[:5]}; not dropping them"
        )
    _whole_or_absent(
        dst, lambda work: stream(specs, reader, layout, file_system_writer(work, progress=progress), IDENTITY)
    )
    return {"tensors": len(specs)}


def dcp_to_hf(
    src: str,
    dst: str,
    layout: Layout | None = None,
    *,
    config_from: str | None = None,
    prefixes=(),
    max_shard_size="5GB",
    overwrite=False,
    progress=False,
) -> dict:
    """A native DCP checkpoint -> an HF checkpoint, through ``layout`` (default: from
    ``config_from``'s config.json, with the merged form read off the DCP tensors' shapes).
    ``config_from``'s config.json and other side files (tokenizer, generation config; not its
    weights, whatever their format) are committed with the weights, in one step."""
    if config_from is not None and read_config(config_from) is None:  # a bad one raises, naming it
        raise CheckpointFormatError(f"{config_from}: no config.json to write with the weights (config_from)")
    if config_from is None and open_store(dst).exists("config.json"):
        # The writer keeps a replaced folder's other files; its config.json describes the old
        # weights, not SRC's: a folder whose config does not match its weights.
        raise CheckpointExistsError(
            f"{dst}: holds a config.json, which would stay beside weights converted from {src} that it "
            f"does not describe; pass --config-from HF_DIR (DST itself to keep it), or remove it"
        )
    reader = dcp.FileSystemReader(src)
    specs, skipped = dcp_specs(reader)
    _check_converted(src, specs, specs, prefixes, "memory")
    if layout is None:
        layout = with_prefixes(detect_layout(config_from or "", infer_style(specs)), prefixes)
    writer = HFStorageWriter(
        dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, copy_from=config_from
    )
    stream(specs, reader, IDENTITY, writer, layout)
    return {"tensors": len(specs), "skipped_non_tensors": skipped, "copied": sorted(writer.side_files)}


def dequantize(
    src: str, dst: str, dtype: torch.dtype = torch.bfloat16, *, max_shard_size="5GB", overwrite=False, progress=False
) -> dict:
    """A quantized HF checkpoint (FP8 block-scaled, MXFP4; from its config.json) -> the same
    checkpoint in ``dtype``, streaming: each process reads and dequantizes only the boxes it
    writes (under ``torchrun`` the tensors are spread over the processes). Keys stay the HF
    keys (GPT-OSS experts take transformers' orientation, as its bf16 checkpoints do); the
    config.json written beside them has no ``quantization_config``."""
    from dcp_hf.layouts.quantized import SwapLastDims

    found = detect_layout(src)
    if found.quantization is None:
        raise ValueError(f"{src}: config.json has no quantization_config; nothing to dequantize")
    layout = Layout(
        tuple(r for r in found.rules if isinstance(r, SwapLastDims)),
        quantization=dataclasses.replace(found.quantization, logical_dtype=dtype),
        name=found.name,
    )
    reader = HFStorageReader(src)
    source = hf_specs(reader)
    specs, _ = layout.memory_specs(source)
    config = read_config(src)
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    # config.json and the tokenizer files are committed with the weights, in one step
    writer = HFStorageWriter(
        dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, config=config, copy_from=src
    )
    stream(specs, reader, layout, writer, IDENTITY)
    copied = sorted(writer.side_files)
    return {
        "layout": layout.name,
        "tensors_in": len(source),
        "tensors_out": len(specs),
        "dequantized": len(source) - len(specs),
        "copied": copied,
    }
