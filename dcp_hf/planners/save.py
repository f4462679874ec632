"""HFSavePlanner: DCP's default save planning, with checks whose errors name the key."""

from __future__ import annotations

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan

from dcp_hf.planners.checks import tensor_specs


class HFSavePlanner(DefaultSavePlanner):
    """The recommended save planner for :class:`HFStorageWriter`.

    It plans like DCP's default planner (replicated tensors are written by one replica only),
    and first checks that all ranks agree on each tensor's shape and dtype: DCP's replica
    deduplication would otherwise silently keep one of two different plain tensors saved
    under one key. The coverage check (every element saved exactly once) is the writer's.
    """

    def __init__(self, *, flatten_state_dict: bool = True, dedup_save_to_lowest_rank: bool = False):
        super().__init__(flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=True,
                         dedup_save_to_lowest_rank=dedup_save_to_lowest_rank)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        tensor_specs(all_plans)
        return super().create_global_plan(all_plans)
