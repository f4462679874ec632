"""HFSavePlanner: DCP's default save planning, with checks whose errors name the key."""

from __future__ import annotations

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner


class HFSavePlanner(DefaultSavePlanner):
    """The recommended save planner for :class:`HFStorageWriter`.

    It plans like DCP's default planner (replicated tensors are written by one replica only);
    the global coverage check (every element of every tensor saved exactly once) is done by the
    writer with messages that name the key and the ranks.
    """

    def __init__(self, *, flatten_state_dict: bool = True, dedup_save_to_lowest_rank: bool = False):
        super().__init__(flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=True,
                         dedup_save_to_lowest_rank=dedup_save_to_lowest_rank)
