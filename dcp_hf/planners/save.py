"""HFSavePlanner: DCP save planning in HF key space, through a layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._sharded_tensor_utils import _flatten_sharded_tensors
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import _create_write_items
from torch.distributed.tensor import DTensor

from dcp_hf import training_state
from dcp_hf.contract import takes_compact_plans, tensor_data
from dcp_hf.contract.plans import ChunkEntry, LocalSummary, MergedPlan, RankAssignment, summarize
from dcp_hf.errors import PeerRankError, StateDictMismatchError, not_a_tensor
from dcp_hf.layouts import IDENTITY, Layout, mem_view
from dcp_hf.layouts.quantized import FP8_MAX
from dcp_hf.planners.checks import tensor_specs
from dcp_hf.tensor_box import TensorBox, TensorBoxes, find_chunk


class LocalChunk(NamedTuple):
    """A chunk of an in-memory tensor on this rank."""

    fqn: str
    shape: tuple[int, ...]  # the global shape
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class SavePiece(NamedTuple):
    """A box of an HF tensor this rank saves, and where its data is in memory: ``hf_*`` in HF
    key space; ``fqn``/``chunk_offsets`` name the local chunk it comes from; the box is at
    ``local_lo`` (size ``local_size``) of that chunk, in its in-memory dims ``mem_dims``."""

    hf_key: str
    hf_shape: tuple[int, ...]
    dtype: torch.dtype
    hf_offsets: tuple[int, ...]
    hf_sizes: tuple[int, ...]
    fqn: str
    chunk_offsets: tuple[int, ...]
    mem_dims: tuple[int, ...]
    local_lo: tuple[int, ...]
    local_size: tuple[int, ...]

    @property
    def source(self) -> MetadataIndex:
        """The local chunk the piece's data comes from."""
        return MetadataIndex(self.fqn, self.chunk_offsets)

    def entry(self) -> ChunkEntry:
        return ChunkEntry(self.hf_key, self.hf_shape, self.dtype, self.hf_offsets, self.hf_sizes, self.fqn)


class _AmaxBox(NamedTuple):
    """A box to quantize: its piece, the index of the first block it touches, the amax of each
    block it touches, and which of those blocks it holds only part of."""

    piece: SavePiece
    first_block: tuple[int, ...]
    amax: torch.Tensor
    split: list[list[int]]


class _Fp8Data(NamedTuple):
    """How an fp8 data box is made from its values: the scales of the blocks it touches, which
    start at block ``hf_offsets // block``."""

    scale: torch.Tensor
    hf_offsets: tuple[int, ...]


def _agree_on_amax(partial: dict, error: str | None) -> dict:
    """Every rank's amax of the blocks they hold parts of, maxed: one all-gather, which also
    tells every rank whether any failed before it (so none waits for a failed one)."""
    gathered: list = [(error, partial)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (error, partial))
    for rank, (err, _) in enumerate(gathered):
        if err is not None:
            raise PeerRankError(f"rank {rank} failed to quantize: {err}")
    merged: dict[tuple, float] = {}
    for _, part in gathered:
        for k, v in part.items():
            merged[k] = max(merged.get(k, 0.0), v)
    return merged


class HFSavePlanner(DefaultSavePlanner):
    """The recommended save planner for :class:`HFStorageWriter`.

    Each local chunk of an in-memory tensor becomes write items in HF key space through the
    ``layout`` (identity by default: keys as they are), each resolved to a view of the local
    chunk, so no full tensor is built. Replicated tensors are written by one replica only.
    It checks that all ranks agree on each HF tensor's shape and dtype, that the chunks cover
    each tensor exactly once and that each HF box comes from one in-memory tensor.

    ``model_prefix`` (e.g. ``"model."``) makes it a training checkpoint: keys starting with it
    are the model (stored without it), every other key, tensor or not, is training state
    stored beside the model (:mod:`dcp_hf.training_state`). Without it every key is the model
    and values that are not tensors are refused.

    With :class:`HFStorageWriter` the plans that travel are compact (:mod:`.summary`): a few
    blocks per rank instead of one item per chunk, so planning stays fast and small at
    thousands of ranks. With another storage writer it makes DCP's usual item plans.
    """

    def __init__(
        self,
        layout: Layout | None = None,
        *,
        model_prefix: str | None = None,
        flatten_state_dict: bool = True,
        dedup_save_to_lowest_rank: bool = False,
    ):
        super().__init__(
            flatten_state_dict=flatten_state_dict,
            flatten_sharded_tensors=True,
            dedup_save_to_lowest_rank=dedup_save_to_lowest_rank,
        )
        self.layout = layout or IDENTITY
        self.model_prefix = model_prefix
        self.compact = False
        self._sources: dict[MetadataIndex, SavePiece] = {}  # HF write index -> where its data is
        self._entries: dict[tuple, SavePiece] = {}  # (HF key, HF offsets) -> its piece (compact plans)
        self._block_keys: list[list[str]] = []
        # (HF key, HF offsets) of a quantized write item -> the scales it writes, or how its fp8
        # data is made.
        self._scales: dict[tuple, torch.Tensor] = {}
        self._fp8_data: dict[tuple, _Fp8Data] = {}

    def set_up_planner(self, state_dict, storage_meta: StorageMeta | None = None, is_coordinator: bool = False) -> None:
        if self.flatten_state_dict and all(not isinstance(v, (Mapping, list, tuple)) for v in state_dict.values()):
            # Already flat (the common case): DCP's flattening would copy it to the same thing.
            self.state_dict, self.mappings = dict(state_dict), {k: (k,) for k in state_dict}
            if self.flatten_sharded_tensors and any(isinstance(v, ShardedTensor) for v in state_dict.values()):
                self.state_dict = _flatten_sharded_tensors(self.state_dict)
            self.is_coordinator = is_coordinator
        else:
            super().set_up_planner(state_dict, storage_meta, is_coordinator)
        self.compact = takes_compact_plans(storage_meta)

    def _chunks(self) -> tuple[list[LocalChunk], list[WriteItem]]:
        """Every local chunk, and the write items of values that are not tensors."""
        chunks, others = [], []
        for fqn, value in self.state_dict.items():
            if isinstance(value, (TensorBox, TensorBoxes)):
                chunks += [
                    LocalChunk(fqn, tuple(b.global_shape), b.dtype, tuple(b.offsets), tuple(b.local.shape))
                    for b in (value.boxes if isinstance(value, TensorBoxes) else [value])
                ]
            elif type(value) is torch.Tensor or type(value) is torch.nn.Parameter:
                chunks.append(LocalChunk(fqn, tuple(value.shape), value.dtype, (0,) * value.dim(), tuple(value.shape)))
            elif isinstance(value, DTensor) and value.device_mesh.get_coordinate() is None:
                continue  # not on this rank's mesh (as DCP's own planner)
            else:
                for item in _create_write_items(fqn, value):
                    if item.type == WriteItemType.BYTE_IO:
                        others.append(item)
                        continue
                    td = tensor_data(item)
                    chunks.append(
                        LocalChunk(
                            fqn, tuple(td.size), td.properties.dtype, tuple(td.chunk.offsets), tuple(td.chunk.sizes)
                        )
                    )
        return chunks, others

    def _pieces(self) -> tuple[list[SavePiece], list[WriteItem]]:
        """Every local chunk's pieces in HF key space."""
        chunks, others = self._chunks()
        entries: list[SavePiece] = []
        seen: dict[tuple, str] = {}
        if self.model_prefix is not None:  # values that are not tensors: bytes of the training state
            entries, others = self._object_pieces(others), []
        if self.layout == IDENTITY and self.model_prefix is None:  # each chunk is its own piece
            return [
                SavePiece(
                    fqn, shape, dtype, offsets, sizes, fqn, offsets, tuple(range(len(shape))), (0,) * len(shape), sizes
                )
                for fqn, shape, dtype, offsets, sizes in chunks
            ], others
        for fqn, shape, dtype, offsets, sizes in chunks:
            for piece in training_state.pieces(self.layout, fqn, shape, self.model_prefix):
                hit = piece.intersect(offsets, sizes)
                if hit is None:
                    continue
                lo, size, hf_off, hf_size = hit
                if (piece.hf_key, hf_off) in seen:
                    raise StateDictMismatchError(
                        f"HF tensor {piece.hf_key!r} at {list(hf_off)} would be saved from both "
                        f"{seen[piece.hf_key, hf_off]!r} and {fqn!r}"
                    )
                seen[piece.hf_key, hf_off] = fqn
                local_lo = tuple(a - b for a, b in zip(lo, offsets))
                entries.append(
                    SavePiece(
                        piece.hf_key,
                        piece.hf_shape,
                        dtype,
                        hf_off,
                        hf_size,
                        fqn,
                        offsets,
                        piece.mem_dims,
                        local_lo,
                        size,
                    )
                )
        if hasattr(self.layout.quantization, "quantizes"):
            entries = self._quantize(entries)
        return entries, others

    def _object_pieces(self, items: list[WriteItem]) -> list[SavePiece]:
        """This rank's share of the values that are not tensors, each a whole uint8 tensor of
        its bytes (in the planner's state dict under its storage key)."""
        out = []
        for key, data in training_state.object_bytes(items, lambda i: self.state_dict[i.index.fqn]).items():
            stored, n = training_state.BYTES + key, data.numel()
            self.state_dict[stored] = data
            out.append(SavePiece(stored, (n,), torch.uint8, (0,), (n,), stored, (0,), (0,), (0,), (n,)))
        return out

    def _quantize(self, entries: list[SavePiece]) -> list[SavePiece]:
        """Entries of the HF tensors the layout quantizes become their fp8 data + scales. The
        scale of a block is amax(|block|) / 448 over all its holders: each rank sends the amax
        of the blocks it holds only part of (all ranks together, once); a block's scale is
        written by the rank holding the block's first element."""
        self._fp8_data, self._scales = {}, {}
        error = None
        kept: list[SavePiece] = []
        boxes: list[_AmaxBox] = []
        partial: dict[tuple, float] = {}
        try:
            kept, boxes, partial = self._block_amaxes(entries)
        except Exception as exc:  # noqa: BLE001 - sent to every rank below, so none waits for this one
            error = f"{type(exc).__name__}: {exc}"
        amax_of = _agree_on_amax(partial, error)
        out = kept
        for box in boxes:
            out += self._fp8_pieces(box, amax_of)
        return out

    def _block_amaxes(self, entries: list[SavePiece]) -> tuple[list[SavePiece], list[_AmaxBox], dict]:
        """The entries left as they are; the amax of each block of every box to quantize; and
        the amax of the blocks a box holds only part of, by (key, block row, block column)."""
        q = self.layout.quantization
        kept: list[SavePiece] = []
        boxes: list[_AmaxBox] = []
        partial: dict[tuple, float] = {}
        for e in entries:
            if not q.quantizes(e.hf_key, e.hf_shape) or 0 in e.hf_sizes:
                kept.append(e)
                continue
            data = mem_view(
                self.lookup_object(MetadataIndex(e.fqn, e.chunk_offsets)), e.local_lo, e.local_size, e.mem_dims
            )
            amax = q.block_amax(data, e.hf_offsets)
            first = tuple(o // b for o, b in zip(e.hf_offsets, q.block))
            whole = [
                torch.tensor([o <= i * b and min((i + 1) * b, n) <= o + m for i in range(low, low + k)])
                for o, m, b, n, low, k in zip(e.hf_offsets, e.hf_sizes, q.block, e.hf_shape, first, amax.shape)
            ]
            split = (~(whole[0][:, None] & whole[1][None, :])).nonzero().tolist()
            for i, j in split:
                k = (e.hf_key, first[0] + i, first[1] + j)
                partial[k] = max(partial.get(k, 0.0), amax[i, j].item())
            boxes.append(_AmaxBox(e, first, amax, split))
        return kept, boxes, partial

    def _fp8_pieces(self, box: _AmaxBox, amax_of: dict) -> list[SavePiece]:
        """The fp8 data piece of a box, and the piece of the scales whose block starts in it."""
        q, e, first = self.layout.quantization, box.piece, box.first_block
        amax = box.amax
        for i, j in box.split:
            amax[i, j] = amax_of[e.hf_key, first[0] + i, first[1] + j]
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones(()))
        out = [e._replace(dtype=q.dtype)]
        self._fp8_data[e.hf_key, e.hf_offsets] = _Fp8Data(scale, e.hf_offsets)
        # The blocks whose first element lies in this box: their scales are written from here.
        own_lo = tuple(-(-o // b) for o, b in zip(e.hf_offsets, q.block))
        own_n = tuple(-(-(o + m) // b) - ol for o, m, b, ol in zip(e.hf_offsets, e.hf_sizes, q.block, own_lo))
        if 0 not in own_n:
            scale_key = e.hf_key + q.scale_suffix
            rows = slice(own_lo[0] - first[0], own_lo[0] - first[0] + own_n[0])
            cols = slice(own_lo[1] - first[1], own_lo[1] - first[1] + own_n[1])
            scale_shape = tuple(-(-n // b) for n, b in zip(e.hf_shape, q.block))
            out.append(
                e._replace(
                    hf_key=scale_key, hf_shape=scale_shape, dtype=torch.float32, hf_offsets=own_lo, hf_sizes=own_n
                )
            )
            self._scales[scale_key, own_lo] = scale[rows, cols].contiguous()
        return out

    def _item(self, entry: SavePiece) -> WriteItem:
        """The write item of a piece (and where resolve_data finds its data)."""
        index = MetadataIndex(entry.hf_key, entry.hf_offsets)
        self._sources[index] = entry
        return WriteItem(
            index=index,
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size(entry.hf_offsets), torch.Size(entry.hf_sizes)),
                properties=TensorProperties(dtype=entry.dtype),
                size=torch.Size(entry.hf_shape),
            ),
        )

    def create_local_plan(self) -> SavePlan:
        entries, others = self._pieces()
        self._sources = {}
        if self.compact:
            if others:
                raise not_a_tensor(others[0].index.fqn)
            self._entries = {(e.hf_key, e.hf_offsets): e for e in entries}
            summary, self._block_keys = summarize(e.entry() for e in entries)
            self.plan = SavePlan([], planner_data=summary)
            return self.plan
        items = [self._item(e) for e in entries]
        origin = {(e.hf_key, torch.Size(e.hf_offsets)): e.fqn for e in entries}
        self.plan = SavePlan(items + others, planner_data=(self.mappings if self.flatten_state_dict else None, origin))
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if self.compact:
            return self._compact_global_plan(all_plans)
        tensor_specs(all_plans)
        seen: dict[tuple, tuple[str, int]] = {}
        for rank, plan in enumerate(all_plans):
            for box, fqn in plan.planner_data[1].items():
                first = seen.setdefault(box, (fqn, rank))
                if first[0] != fqn:
                    raise StateDictMismatchError(
                        f"HF tensor {box[0]!r} at {list(box[1])} is saved from {first[0]!r} on rank "
                        f"{first[1]} and from {fqn!r} on rank {rank}: two different tensors map to one key"
                    )
        all_plans = [dataclasses.replace(p, planner_data=p.planner_data[0]) for p in all_plans]
        return super().create_global_plan(all_plans)

    def _compact_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        summaries = [p.planner_data for p in all_plans]
        if not all(isinstance(s, LocalSummary) for s in summaries):
            raise StateDictMismatchError("every rank must save with an HFSavePlanner")
        merged = MergedPlan(summaries, lowest_rank=self.dedup_save_to_lowest_rank)
        # The checkpoint holds each HF tensor whole, in one file: one chunk each.
        metadata = Metadata(
            {
                key: TensorStorageMetadata(
                    TensorProperties(dtype=dtype),
                    torch.Size(shape),
                    [ChunkStorageMetadata(torch.Size([0] * len(shape)), torch.Size(shape))],
                )
                for key, (shape, dtype) in merged.table.items()
            }
        )
        plans = [dataclasses.replace(p, planner_data=merged.assignment(rank)) for rank, p in enumerate(all_plans)]
        self.global_plan, self.metadata = plans, metadata
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        if not self.compact:
            return super().finish_plan(new_plan)
        assignment: RankAssignment = new_plan.planner_data
        items = [
            self._item(self._entries[key, block.offsets])
            for b, (block, keys) in enumerate(zip(self.plan.planner_data.blocks, self._block_keys))
            for key in assignment.keeps(b, keys)
        ]
        return dataclasses.replace(new_plan, items=items)

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        piece = self._sources[write_item.index]
        where = (write_item.index.fqn, tuple(write_item.index.offset or ()))
        if where in self._scales:  # the scales of the blocks this rank writes
            return self._scales[where]
        size = piece.local_size
        box = mem_view(self.fetch(piece.source, piece.local_lo, size), (0,) * len(size), size, piece.mem_dims)
        fp8 = self._fp8_data.get(where)
        if fp8 is not None:
            return self.layout.quantization.quantize(box, fp8.scale, fp8.hf_offsets)
        return box

    def fetch(self, source: MetadataIndex, lo: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        """The box (lo, size) of the local chunk ``source`` (in-memory dims). Subclasses may
        produce it on demand instead (see :mod:`dcp_hf.streaming`)."""
        local = self.lookup_object(source)
        for d, (o, n) in enumerate(zip(lo, size)):
            local = local.narrow(d, o, n)
        return local

    def lookup_object(self, index: MetadataIndex):
        return find_chunk(self.state_dict, index)
