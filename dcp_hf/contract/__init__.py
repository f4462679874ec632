"""What dcp-hf's planners and its storage layer tell each other, in one place both import.

Save (``dcp.save``; ``C`` marks the coordinator only):
  1. ``HFStorageWriter.storage_meta()`` lists :data:`COMPACT_PLANS` in ``StorageMeta.modules``:
     the writer takes compact plans.
  2. ``HFSavePlanner.set_up_planner(..., storage_meta)`` sees it (:func:`takes_compact_plans`)
     and ``create_local_plan`` sends a ``LocalSummary`` as ``planner_data`` instead of items.
  3. C: ``create_global_plan`` merges the summaries into a ``MergedPlan`` and gives each rank a
     ``RankAssignment`` (which blocks it writes); the coordinator's copy carries the merge.
  4. C: ``HFStorageWriter.prepare_global_plan`` reads the merge (:func:`merged_plan`; it makes
     one from plain write items when another planner is used) and lays out the files.
  5. ``write_data`` / C: ``finish``.
Load (``dcp.load``):
  1. ``HFStorageReader.read_metadata`` returns :class:`HFMetadata`; the load planner reads what
     it needs of it through :class:`LoadSource` (DCP's own ``Metadata`` gives the defaults).
  2. With ``compact_plans`` the read items stay on their rank; the coordinator gets a code of
     the keys each rank loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem

from dcp_hf.contract.plans import (
    ChunkEntry,
    LocalSummary,
    MergedPlan,
    RankAssignment,
    decode_table,
    encode_table,
    summarize,
)
from dcp_hf.errors import StateDictMismatchError

__all__ = [
    "COMPACT_PLANS",
    "HFMetadata",
    "LoadSource",
    "LocalSummary",
    "MergedPlan",
    "RankAssignment",
    "decode_table",
    "encode_table",
    "merged_plan",
    "takes_compact_plans",
    "tensor_data",
]

# In ``StorageMeta.modules``: the storage writer takes compact plans (:mod:`.plans`).
COMPACT_PLANS = "dcp_hf.compact_plans"


def takes_compact_plans(storage_meta: StorageMeta | None) -> bool:
    return storage_meta is not None and COMPACT_PLANS in (storage_meta.modules or [])


def tensor_data(item: WriteItem) -> TensorWriteData:
    """The tensor of a write item (DCP leaves it None for BYTE_IO items)."""
    if item.tensor_data is None:
        raise StateDictMismatchError(f"{item.index.fqn!r} is not a tensor")
    return item.tensor_data


def merged_plan(plans: list[SavePlan]) -> MergedPlan:
    """The merge of every rank's chunks: HFSavePlanner's, or made here from item plans."""
    data = plans[0].planner_data
    if isinstance(data, RankAssignment) and data.merged is not None:
        return data.merged
    if isinstance(data, LocalSummary):
        raise StateDictMismatchError("compact save plans reached the writer unmerged")

    def entry(item: WriteItem) -> ChunkEntry:
        td = tensor_data(item)
        key = item.index.fqn
        return ChunkEntry(key, tuple(td.size), td.properties.dtype, tuple(td.chunk.offsets), tuple(td.chunk.sizes), key)

    return MergedPlan([summarize(entry(i) for i in p.items)[0] for p in plans])


@dataclass
class HFMetadata(Metadata):
    """DCP metadata of an HF checkpoint (``HFStorageReader.read_metadata``); its
    ``state_dict_metadata`` reads file headers on demand."""

    checkpoint: str = ""  # where, for error messages
    allow_dtype_cast: bool = False
    compact_plans: bool = True  # the reader takes load plans whose items stay on their rank
    read_headers: Callable[[Iterable[str]], None] | None = None  # of the files holding these keys

    def prefetch(self, keys: Iterable[str]) -> None:
        """Read the headers of the files holding ``keys`` now, concurrently, instead of one
        file at a time as the planner looks keys up."""
        if self.read_headers is not None:
            self.read_headers(keys)


@dataclass(frozen=True)
class LoadSource:
    """What the load planner knows of the checkpoint it loads."""

    checkpoint: str = "checkpoint"  # where, for error messages
    allow_dtype_cast: bool = True  # DCP's own readers cast
    compact_plans: bool = False  # the reader keeps read items on their rank
    prefetch: Callable[[Iterable[str]], None] | None = None  # read the headers of these keys' files

    @classmethod
    def of(cls, metadata: Metadata | None) -> "LoadSource":
        if not isinstance(metadata, HFMetadata):
            return cls()  # another reader: DCP's defaults
        return cls(
            checkpoint=metadata.checkpoint or cls.checkpoint,
            allow_dtype_cast=metadata.allow_dtype_cast,
            compact_plans=metadata.compact_plans,
            prefetch=metadata.prefetch,
        )
