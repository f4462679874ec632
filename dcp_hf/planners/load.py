"""HFLoadPlanner: DCP's default load planning, with up-front checks that name file and key."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

from dcp_hf.errors import StateDictMismatchError


class HFLoadPlanner(DefaultLoadPlanner):
    """The recommended load planner for :class:`HFStorageReader`.

    Before any byte is read it checks, on every rank, that each key of the state dict is in
    the checkpoint (``allow_missing`` lists keys that may be absent and are then left as they
    are), with the same shape and dtype (unless the reader allows dtype casts).
    """

    def __init__(self, *, allow_missing: Iterable[str] = (), allow_partial_load: bool = False):
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True,
                         allow_partial_load=True)
        self.allow_missing = set(allow_missing)
        self.strict = not allow_partial_load

    def set_up_planner(self, state_dict, metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        prefetch = getattr(metadata.state_dict_metadata, "prefetch", None)
        if prefetch is not None:
            prefetch(self.state_dict.keys())

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata
        where = getattr(md, "checkpoint", "") or "checkpoint"
        cast_ok = getattr(md, "allow_dtype_cast", True)
        missing = [k for k in self.state_dict
                   if k not in md.state_dict_metadata and k not in self.allow_missing]
        if missing and self.strict:
            raise StateDictMismatchError(
                f"{where}: missing {len(missing)} key(s) the state dict needs: "
                f"{', '.join(repr(k) for k in missing[:10])}{' ...' if len(missing) > 10 else ''}")
        for key, value in self.state_dict.items():
            if key not in md.state_dict_metadata:
                continue
            stored = md.state_dict_metadata[key]
            if not isinstance(stored, TensorStorageMetadata):
                continue
            if not isinstance(value, torch.Tensor):
                raise StateDictMismatchError(
                    f"{where}: {key!r} is a tensor in the checkpoint but {type(value).__name__} in the state dict")
            if tuple(value.shape) != tuple(stored.size):
                raise StateDictMismatchError(
                    f"{where}: {key!r} has shape {list(stored.size)} in the checkpoint but "
                    f"{list(value.shape)} in the state dict")
            if value.dtype != stored.properties.dtype and not cast_ok:
                raise StateDictMismatchError(
                    f"{where}: {key!r} is {stored.properties.dtype} in the checkpoint but "
                    f"{value.dtype} in the state dict (pass allow_dtype_cast=True to the reader)")
        return super().create_local_plan()
