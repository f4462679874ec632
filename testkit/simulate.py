"""A save's planning for many ranks, simulated in one process: what each rank sends the
coordinator, what it sends back, and how long each takes, without starting the ranks (state
dicts of meta tensors in TensorBoxes need no data). For measuring and testing planning at
scale (``python -m benchmarks planning``, tests/test_plans.py); nothing is written."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable


@dataclass
class SimulatedSave:
    """The plans of a save simulated in one process (see :func:`simulate_save_plans`)."""

    local_plans: list  # what each rank sends to the coordinator
    global_plans: list  # what the coordinator sends back to each rank
    local_seconds: list[float]
    global_seconds: float
    coordinator: tuple  # (planner, writer) of rank 0
    planners: list | None = None  # every rank's planner, when kept

    def final_items(self, rank: int) -> list:
        """The write items ``rank`` writes (its planner's finish_plan)."""
        return self.planners[rank].finish_plan(self.global_plans[rank]).items


def simulate_save_plans(
    states: Iterable[dict], path: str, layout=None, keep_planners: bool = False, **writer_options
) -> SimulatedSave:
    """Plan a save of ``states`` (one state dict per simulated rank, e.g. of meta tensors in
    TensorBoxes: no data is needed) exactly as ``dcp.save`` with HFSavePlanner and
    HFStorageWriter would, in this process: every rank's local plan, then the coordinator's
    global plan. Nothing is written. For tests, and for planning at scale without the ranks."""
    import gc

    from dcp_hf import HFSavePlanner, HFStorageWriter

    local_plans, seconds, planners, coordinator = [], [], [], None
    collect = gc.isenabled()
    gc.disable()  # this process holds every rank's plan; a real rank holds one
    try:
        for rank, state in enumerate(states):
            planner = HFSavePlanner(layout)
            writer = HFStorageWriter(path, **writer_options)
            t0 = time.perf_counter()
            planner.set_up_planner(state, storage_meta=writer.storage_meta(), is_coordinator=rank == 0)
            writer.set_up_storage_writer(rank == 0)
            local_plans.append(writer.prepare_local_plan(planner.create_local_plan()))
            seconds.append(time.perf_counter() - t0)
            if rank == 0:
                coordinator = (planner, writer)
            if keep_planners:
                planners.append(planner)
        planner, writer = coordinator
        t0 = time.perf_counter()
        global_plans, _ = planner.create_global_plan(local_plans)
        global_plans = writer.prepare_global_plan(global_plans)
        global_seconds = time.perf_counter() - t0
    finally:
        if collect:
            gc.enable()
    return SimulatedSave(
        local_plans, global_plans, seconds, global_seconds, coordinator, planners if keep_planners else None
    )
