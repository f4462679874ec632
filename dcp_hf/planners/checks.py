"""Global checks on save plans, with errors that name the key and the ranks."""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.checkpoint.planner import SavePlan

from dcp_hf.errors import StateDictMismatchError
from dcp_hf.format import TensorSpec


def tensor_specs(
    plans: list[SavePlan], export_dtype: Callable[[str, torch.dtype], torch.dtype] = lambda k, d: d
) -> dict[str, TensorSpec]:
    """key -> (dtype, global shape), checking that every rank agrees on both."""
    specs: dict[str, TensorSpec] = {}
    first_rank: dict[str, int] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            if item.tensor_data is None:
                continue
            key, td = item.index.fqn, item.tensor_data
            spec = TensorSpec(key, export_dtype(key, td.properties.dtype), tuple(td.size))
            known = specs.setdefault(key, spec)
            first_rank.setdefault(key, rank)
            if known != spec:
                raise StateDictMismatchError(
                    f"{key!r}: ranks disagree on the tensor: rank {first_rank[key]} has shape "
                    f"{list(known.shape)} {known.dtype}, rank {rank} has shape {list(spec.shape)} "
                    f"{spec.dtype}"
                )
    return specs
