"""TensorBox: a rank's chunk of a larger tensor, as a state-dict value DCP understands."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from dcp_hf.errors import StateDictMismatchError


class TensorBox:
    """``local`` holds the box at ``offsets`` of a tensor of ``global_shape`` (as Megatron's
    sharded tensors and any hand-made sharding do).

    Save and load it with dcp-hf's planners (``planner=HFSavePlanner()`` /
    ``HFLoadPlanner()``), which read and write the box in place. DCP's default planners cannot:
    they find a chunk only in a tensor, a DTensor or a ShardedTensor; saving one with them is an
    error that says so, and loading one with them fails in DCP's planning ("expected
    BytesStorageMetadata").
    """

    def __init__(self, local: torch.Tensor, offsets, global_shape):
        self.local = local
        self.offsets = torch.Size(offsets)
        self.global_shape = torch.Size(global_shape)
        if (
            len(self.offsets) != local.dim()
            or len(self.global_shape) != local.dim()
            or any(o < 0 or o + n > g for o, n, g in zip(self.offsets, local.shape, self.global_shape))
        ):
            raise ValueError(
                f"box at {list(self.offsets)} of shape {list(local.shape)} does not "
                f"fit in a tensor of shape {list(self.global_shape)}"
            )

    def size(self) -> torch.Size:
        return self.global_shape

    @property
    def shape(self) -> torch.Size:
        return self.global_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def __repr__(self) -> str:
        return (
            f"TensorBox(offsets={list(self.offsets)}, local={list(self.local.shape)}, "
            f"global={list(self.global_shape)}, dtype={self.dtype})"
        )

    # -- what DCP's load-plan helpers call (through HFLoadPlanner) ----------------------------
    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.offset is not None and index.offset != self.offsets:
            raise ValueError(f"{index.fqn!r}: no chunk at {list(index.offset)} in this TensorBox")
        return self.local

    def __create_write_items__(self, fqn: str, obj) -> list:
        """Called only by planners that do not know TensorBox (ours read it directly)."""
        raise StateDictMismatchError(
            f"{fqn!r} is a TensorBox: save it with planner=HFSavePlanner() (and load it with "
            f"planner=HFLoadPlanner()); DCP's default planners cannot resolve its data"
        )


class TensorBoxes:
    """Several boxes of one tensor on this rank (TensorBoxes of the same global shape and dtype
    at different offsets), e.g. a distributed optimizer's flat range of a parameter, cut into
    boxes. A state-dict value for dcp-hf's planners, as TensorBox."""

    def __init__(self, boxes: list[TensorBox]):
        if not boxes:
            raise ValueError("TensorBoxes needs at least one box")
        self.boxes = list(boxes)
        self.global_shape = boxes[0].global_shape
        if any(b.global_shape != self.global_shape or b.dtype != boxes[0].dtype for b in boxes):
            raise ValueError(f"boxes of different tensors in one TensorBoxes: {boxes}")
        self._by_offsets = {tuple(b.offsets): b for b in boxes}
        if len(self._by_offsets) != len(boxes):
            raise ValueError(f"two boxes at one offset in one TensorBoxes: {boxes}")

    def size(self) -> torch.Size:
        return self.global_shape

    @property
    def shape(self) -> torch.Size:
        return self.global_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.boxes[0].dtype

    def __repr__(self) -> str:
        return f"TensorBoxes({self.boxes})"

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [c for b in self.boxes for c in b.__create_chunk_list__()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        box = self._by_offsets.get(tuple(index.offset) if index.offset is not None else None)
        if box is None:
            raise ValueError(f"{index.fqn!r}: no chunk at {index.offset} in this TensorBoxes")
        return box.local

    def __create_write_items__(self, fqn: str, obj) -> list:
        return self.boxes[0].__create_write_items__(fqn, obj)


BOXES = (TensorBox, TensorBoxes)  # the state-dict values only dcp-hf's planners resolve


def find_chunk(state_dict: dict, index: MetadataIndex) -> torch.Tensor:
    """The local tensor of chunk ``index`` (DCP's own lookup, plus TensorBox values)."""
    from torch.distributed.checkpoint.utils import find_state_dict_object

    value = state_dict.get(index.fqn)
    if isinstance(value, BOXES):
        return value.__get_tensor_shard__(index)
    return find_state_dict_object(state_dict, index)
