"""HFSavePlanner: DCP save planning in HF key space, through a layout."""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from dcp_hf.errors import StateDictMismatchError
from dcp_hf.layouts import IDENTITY, Layout, mem_view
from dcp_hf.planners.checks import tensor_specs
from dcp_hf.tensor_box import find_chunk


class HFSavePlanner(DefaultSavePlanner):
    """The recommended save planner for :class:`HFStorageWriter`.

    Each local chunk of an in-memory tensor becomes write items in HF key space through the
    ``layout`` (identity by default: keys as they are), each resolved to a view of the local
    chunk, so no full tensor is built. Replicated tensors are written by one replica only.
    Before DCP's replica deduplication, it checks that all ranks agree on each HF tensor's
    shape and dtype and that each HF box comes from one in-memory tensor: deduplication would
    otherwise silently keep one of two different tensors saved under one key.
    """

    def __init__(self, layout: Layout | None = None, *, flatten_state_dict: bool = True,
                 dedup_save_to_lowest_rank: bool = False):
        super().__init__(flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=True,
                         dedup_save_to_lowest_rank=dedup_save_to_lowest_rank)
        self.layout = layout or IDENTITY
        # HF write index -> (in-memory index, piece's mem dims, box offsets in the local chunk, box sizes)
        self._sources: dict[MetadataIndex, tuple] = {}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items, origin = [], {}
        self._sources = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                items.append(item)
                continue
            td = item.tensor_data
            offsets, sizes = tuple(td.chunk.offsets), tuple(td.chunk.sizes)
            for piece in self.layout.pieces(item.index.fqn, tuple(td.size)):
                hit = piece.intersect(offsets, sizes)
                if hit is None:
                    continue
                lo, size, hf_off, hf_size = hit
                index = MetadataIndex(piece.hf_key, hf_off)
                if index in self._sources:
                    raise StateDictMismatchError(
                        f"HF tensor {piece.hf_key!r} at {list(hf_off)} would be saved from both "
                        f"{self._sources[index][0].fqn!r} and {item.index.fqn!r}")
                local_lo = tuple(a - b for a, b in zip(lo, offsets))
                self._sources[index] = (item.index, piece.mem_dims, local_lo, size)
                origin[piece.hf_key, hf_off] = item.index.fqn
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(hf_off), torch.Size(hf_size)),
                    properties=td.properties, size=torch.Size(piece.hf_shape))))
        self.plan = dataclasses.replace(plan, items=items, planner_data=(plan.planner_data, origin))
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        tensor_specs(all_plans)
        seen: dict[tuple, tuple[str, int]] = {}
        for rank, plan in enumerate(all_plans):
            for box, fqn in plan.planner_data[1].items():
                first = seen.setdefault(box, (fqn, rank))
                if first[0] != fqn:
                    raise StateDictMismatchError(
                        f"HF tensor {box[0]!r} at {list(box[1])} is saved from {first[0]!r} on rank "
                        f"{first[1]} and from {fqn!r} on rank {rank}: two different tensors map to one key")
        all_plans = [dataclasses.replace(p, planner_data=p.planner_data[0]) for p in all_plans]
        return super().create_global_plan(all_plans)

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        source, mem_dims, lo, size = self._sources[write_item.index]
        box = self.fetch(source, lo, size)
        return mem_view(box, (0,) * len(size), size, mem_dims)

    def fetch(self, source: MetadataIndex, lo: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        """The box (lo, size) of the local chunk ``source`` (in-memory dims). Subclasses may
        produce it on demand instead (see :mod:`dcp_hf.convert`)."""
        local = self.lookup_object(source)
        for d, (o, n) in enumerate(zip(lo, size)):
            local = local.narrow(d, o, n)
        return local

    def lookup_object(self, index: MetadataIndex):
        return find_chunk(self.state_dict, index)
