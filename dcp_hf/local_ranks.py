"""Run a function on N local processes joined by a gloo process group: the ranks of ``dcp-hf
demo`` (and of the tests and benchmarks), without ``torchrun``."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from typing import Any, Callable


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
