"""Offline conversions that stream: merged <-> per-expert HF checkpoints, HF <-> native DCP.

Nothing is loaded up front. The state dict handed to ``dcp.save`` holds meta tensors (shapes
and dtypes only); when the writer asks for a box of one, it is read from the source at that
moment, through the source layout, in bands of whole source rows read ahead of the writer
(see ``StreamingSavePlanner``). So a process holds a few bands (about 32 MiB by default) and
the boxes being written (an expert's matrices when splitting, one merged tensor when merging),
and under ``torchrun`` the tensors are spread over the processes by size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import secrets
import shutil
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader

from dcp_hf.errors import CheckpointExistsError, CheckpointFormatError, on_every_rank, root_cause
from dcp_hf.format import TensorSpec
from dcp_hf.layouts import IDENTITY, Layout, MergedExperts, Prefix, detect_layout, infer_style, mem_view
from dcp_hf.layouts.models import MINDSPEED_MODELS, TRANSFORMERS_MOE, mindspeed_model, read_config
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.progress import file_system_writer
from dcp_hf.storage import HFStorageReader, HFStorageWriter, commit
from dcp_hf.storage.hf_files import read_side_files, side_files_of
from dcp_hf.storage.stores import is_url, open_store
from dcp_hf.tensor_box import TensorBox


@dataclass(eq=False)
class _Band:
    """Rows [lo, hi) of a local source chunk, read whole (long contiguous reads) and shared by
    the boxes that lie in it, e.g. the gate and up halves of an expert's rows of a merged
    tensor. A band of several boxes, of at most ``band_bytes``, is read into a reused buffer
    (``pooled``), so its boxes are copied out of it; a larger one, or one that is a single box,
    is read into memory of its own (a single box is then written as it was read)."""

    source: MetadataIndex
    lo: int
    hi: int
    nbytes: int
    uses: int  # boxes not yet copied out
    pooled: bool
    state: str = "new"  # new -> reading -> read
    tensor: torch.Tensor | None = None
    error: BaseException | None = None


class _BandReader:
    """Reads ``bands`` (in the order the writer asks for them) on one thread, ahead of the
    writer, so that reading overlaps the writer's copies and writes, while the bands held (read
    or being read, with boxes not yet copied out) stay within ``budget`` bytes. Pooled bands
    go into a few reused buffers of ``buffer_bytes`` (no page faults, no allocator growth). A
    band the writer asks for before the thread has read it is read by the writer's thread,
    whatever the budget (a band larger than the budget is read only then)."""

    def __init__(self, bands: list[_Band], read, budget: int, buffer_bytes: int):
        self.bands, self.read, self.budget, self.buffer_bytes = bands, read, budget, buffer_bytes
        self.held = 0  # bytes
        self.free: list = []  # storages of buffer_bytes
        self.closed = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def take(self, band: _Band) -> torch.Tensor:
        """The band's tensor, to copy a box out of; ``release`` the band after the copy."""
        with self.cond:
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._read_ahead, name="dcp-hf-band", daemon=True)
                self.thread.start()
            mine = band.state == "new"
            if mine:
                band.state, self.held = "reading", self.held + band.nbytes
        if mine:
            self._load(band)
        with self.cond:
            self.cond.wait_for(lambda: band.state == "read")
            if band.error is not None:
                raise band.error
            return band.tensor

    def release(self, band: _Band) -> None:
        with self.cond:
            band.uses -= 1
            if band.uses == 0:
                if band.pooled:
                    self.free.append(band.tensor.untyped_storage())
                band.tensor, self.held = None, self.held - band.nbytes
                self.cond.notify_all()

    def _read_ahead(self) -> None:
        for band in self.bands:
            with self.cond:
                self.cond.wait_for(
                    lambda band=band: self.closed or band.state != "new" or self.held + band.nbytes <= self.budget
                )
                if self.closed:
                    return
                if band.state != "new":
                    continue
                band.state, self.held = "reading", self.held + band.nbytes
            self._load(band)

    def _load(self, band: _Band) -> None:
        tensor, error = None, None
        try:
            buffer = None
            if band.pooled:
                with self.cond:
                    buffer = self.free.pop() if self.free else None
                if buffer is None:
                    buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8).untyped_storage()
            tensor = self.read(band, buffer)
        except Exception as e:  # raised in the writer threads that take the band
            error = e
        with self.cond:
            band.tensor, band.error, band.state = tensor, error, "read"
            if error is not None:
                self.held -= band.nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()


def _dense(view: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``view`` in contiguous memory (new memory if ``fresh``), for the writer to write as it
    is. A transposed 2-D box (an expert's gate, up or down matrix in a band) is copied row by
    row first, so that the transpose takes torch's blocked path for a transposed contiguous
    matrix: several times faster than the element-by-element copy of a strided one."""
    if view.is_contiguous():
        return view.clone() if fresh else view
    if view.dim() == 2 and view.stride(0) == 1:
        return view.T.contiguous().T.contiguous()
    return view.contiguous()


class StreamingSavePlanner(HFSavePlanner):
    """Save meta tensors whose data is read from ``source`` (through ``source_layout``) when
    the writer needs it.

    The write items are put in source order and their boxes grouped into bands: runs of whole
    rows of a source chunk, of about ``band_bytes``, that the boxes inside them cover. A band
    is read in one request (long reads, instead of a short strided run per row of each box),
    ahead of the writer within ``bands_ahead * band_bytes`` bytes, and each box is copied out
    of it in the writer's order (a transpose, when splitting experts). So a process holds
    about that many bytes of source data, plus the boxes being written. A band must hold at
    least one expert's rows to be read ahead; larger ones are read when first needed. Call
    ``close`` after the save."""

    def __init__(
        self,
        layout: Layout,
        source: StorageReader,
        source_layout: Layout,
        *,
        band_bytes: int = 16 << 20,
        bands_ahead: int = 2,
    ):
        super().__init__(layout)
        self.source = source
        self.source_layout = source_layout
        self.band_bytes = band_bytes
        self.bands_ahead = bands_ahead
        self.source_metadata = source.read_metadata()
        source.set_up_storage_reader(self.source_metadata, True)
        self._band_of: dict[MetadataIndex, _Band] = {}  # write item -> the band its box lies in
        self._reader: _BandReader | None = None

    def _chunk_shape(self, fqn: str) -> tuple[int, ...]:
        value = self.state_dict[fqn]
        return tuple(value.local.shape if isinstance(value, TensorBox) else value.shape)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)

        def position(item):
            piece = self._sources.get(item.index)
            if piece is None:
                return "", (), ()
            return piece.fqn, tuple(piece.chunk_offsets), tuple(piece.local_lo)

        items = sorted(plan.items, key=position)
        bands = self._plan_bands(items)
        self.close()
        self._reader = _BandReader(
            list(dict.fromkeys(bands.values())), self._read_band, self.bands_ahead * self.band_bytes, self.band_bytes
        )
        self._band_of = bands
        return dataclasses.replace(plan, items=items)

    def _plan_bands(self, items) -> dict[MetadataIndex, _Band]:
        """Consecutive boxes (in source order) grouped into bands of about ``band_bytes`` (a
        box that shares rows with a band joins it whatever its size); the boxes of a group
        that does not cover its rows (a band would read bytes nobody asked for) are read alone."""
        bands, group = {}, []  # group: (item index, source, lo, size) of the open band's boxes

        def end(boxes) -> int:
            return max(lo[0] + size[0] for _, _, lo, size in boxes)

        def close():
            if group:
                source, lo, hi = group[0][1], group[0][2][0], end(group)
                shape = self._chunk_shape(source.fqn)
                row = math.prod(shape[1:])
                if sum(math.prod(size) for *_, size in group) >= (hi - lo) * row:
                    nbytes = (hi - lo) * row * self.state_dict[source.fqn].dtype.itemsize
                    # a band that is one box is read into memory of its own and written as it
                    # is; one shared by boxes goes into a reused buffer they are copied out of
                    pooled = nbytes <= self.band_bytes and len(group) > 1
                    band = _Band(source, lo, hi, nbytes, len(group), pooled)
                    bands.update((index, band) for index, *_ in group)
                group.clear()

        for item in items:
            if item.index not in self._sources:
                continue
            piece = self._sources[item.index]
            source, lo, size = piece.source, piece.local_lo, piece.local_size
            if not size or 0 in size:
                continue  # a scalar or an empty box: nothing to share
            box = (item.index, source, tuple(lo), tuple(size))
            if group:
                first, hi = group[0], end(group + [box])
                row_bytes = math.prod(self._chunk_shape(source.fqn)[1:]) * self.state_dict[source.fqn].dtype.itemsize
                if source != first[1] or (hi > end(group) and (hi - first[2][0]) * row_bytes > self.band_bytes):
                    close()
            group.append(box)
        close()
        return bands

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:  # ``stream``'s objects: serialized already
            return self.lookup_object(write_item.index)
        band = self._band_of.get(write_item.index)
        if band is None:
            return _dense(super().resolve_data(write_item), fresh=False)
        piece = self._sources[write_item.index]
        mem_dims, lo, size = piece.mem_dims, piece.local_lo, piece.local_size
        tensor = self._reader.take(band)
        try:
            box = mem_view(tensor, (lo[0] - band.lo,) + tuple(lo[1:]), size, mem_dims)
            return _dense(box, fresh=band.pooled)  # a pooled band's buffer is read into again
        finally:
            self._reader.release(band)

    def _read_band(self, band: _Band, buffer) -> torch.Tensor:
        shape = self._chunk_shape(band.source.fqn)
        size = (band.hi - band.lo,) + shape[1:]
        dtype = self.state_dict[band.source.fqn].dtype
        out = None if buffer is None else torch.empty(0, dtype=dtype).set_(buffer, 0, size)
        return self.fetch(band.source, (band.lo,) + (0,) * (len(shape) - 1), size, out)

    def fetch(
        self, source: MetadataIndex, lo: tuple[int, ...], size: tuple[int, ...], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The box (lo, size) of the local chunk ``source``, read from the source checkpoint
        (into ``out`` if given)."""
        value = self.state_dict[source.fqn]  # a meta tensor or a TensorBox of one
        chunk_lo = tuple(source.offset) if source.offset is not None else (0,) * len(lo)
        out = torch.empty(size, dtype=value.dtype) if out is None else out
        box = TensorBox(out, [c + o for c, o in zip(chunk_lo, lo)], tuple(value.size()))
        planner = HFLoadPlanner(self.source_layout)
        planner.set_up_planner({source.fqn: box}, self.source_metadata, True)
        plan = planner.finish_plan(planner.create_local_plan())
        try:
            self.source.read_data(plan, planner).wait()
        except (EOFError, pickle.UnpicklingError) as e:  # DCP's own reader on a cut-short file
            where = getattr(self.source, "path", "the source checkpoint")
            raise CheckpointFormatError(f"{where}: {source.fqn!r}: its data ends early or is corrupt ({e})") from e
        return out

    def close(self) -> None:
        """Stop reading ahead (after the save, or when it failed)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


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


def stream(
    specs: dict[str, TensorSpec],
    source: StorageReader,
    source_layout: Layout,
    writer,
    dest_layout: Layout,
    band_bytes: int = 16 << 20,
    objects: dict | None = None,
) -> None:
    """Write ``specs`` (in-memory tensors) with ``writer`` through ``dest_layout``, reading each
    box from ``source`` through ``source_layout`` (see ``StreamingSavePlanner``). ``objects``:
    key -> ``io.BytesIO`` of bytes serialized already, written as they are (by the first
    process), as megatron-core's writer writes its sharded objects."""
    planner = StreamingSavePlanner(dest_layout, source, source_layout, band_bytes=band_bytes)
    share = _my_share(specs)
    if objects and is_main():
        share.update(objects)
    # an HFStorageReader keeps its files and threads across the reads of the bands
    session = source.session() if hasattr(source, "session") else contextlib.nullcontext()
    try:
        with session:
            dcp.save(share, storage_writer=writer, planner=planner, no_dist=not dist.is_initialized())
    finally:
        planner.close()


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


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy what MindSpeed-MM's converters copy from an HF folder, subfolders included: every
    file but ``*.safetensors`` (see ``is_side_file``), less the index and hidden names."""
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
    band_bytes: int = 16 << 20,
) -> dict:
    """``merge``: per-expert HF -> merged HF; ``split``: merged HF -> per-expert HF, as
    MindSpeed-MM's ``moe_expert --style merge|split`` does for its models (see
    ``experts_layout``). ``style`` (transformers, mindspeed, flat) overrides the merged form.
    Whatever the layout cannot map back and forth exactly is refused, on every rank, before
    anything is written; non-weight files are copied, subfolders included. ``band_bytes``: the
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
    stream(plan.specs, plan.reader, plan.source_layout, writer, plan.dest_layout, band_bytes)
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
