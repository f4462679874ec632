"""Run a function on N local processes joined by a gloo process group (tests, demo, benchmarks)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable


class RankFailure(RuntimeError):
    """One or more ranks raised or died; the message holds each failing rank's traceback.
    ``results`` maps each rank that finished to (ok, value or traceback); ``lost`` lists the
    ranks that did not finish (killed, crashed or timed out)."""

    def __init__(self, message: str, results: dict[int, tuple[bool, Any]], lost: list[int]):
        super().__init__(message)
        self.results, self.lost = results, lost


def _entry(fn, rank, world_size, init_file, args, queue, pg_timeout):
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    pg_timeout: float = 300,
    daemon: bool = True,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with a gloo
    process group initialized (collectives time out after ``pg_timeout`` seconds); return each
    rank's result (picklable), or raise RankFailure with every failing rank's traceback.
    Processes still running after ``timeout`` seconds are killed and reported. ``daemon=False``
    lets ``fn`` start processes of its own (megatron-core's checkpoint writer does)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dcp-hf-pg-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, init_file, args, queue, pg_timeout), daemon=daemon)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            try:
                rank, ok, value = queue.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                results[rank] = (ok, value)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and all(not p.is_alive() for p in procs):
                    break
                if time.monotonic() > deadline:
                    break
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(results.items()) if not ok]
    lost = [r for r in range(world_size) if r not in results]
    if lost:
        failures.append(
            f"ranks {lost} did not finish within {timeout:.0f} s (exit codes {[procs[r].exitcode for r in lost]})"
        )
    if failures:
        raise RankFailure("\n".join(failures), results, lost)
    return [results[r][1] for r in range(world_size)]


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
