"""Training-checkpoint save (issue 22): the whole training state (the model's weights and two
Adam moments of the same shapes and sharding, a step tensor per parameter, param groups, a step
counter) in one ``dcp.save``, ours (the HF checkpoint + ``training_state*.safetensors``,
``HFSavePlanner(model_prefix="model.")``) against DCP's own ``FileSystemWriter`` on the same
state dict, side by side in the same processes, alternating. ``ours_async`` is ``dcp.async_save``
waited for at once: its time is the whole save; the time until ``async_save`` returned (what
training waits for) is reported as ``blocking_s``."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time

import torch

from benchmarks.core import build_state, scaled_shape

OPS = ["ours", "ours_async", "dcp_filesystem_writer"]
SHARDINGS = [(2, "shard0", "Shard(0)"), (2, "shard1", "Shard(1)"), (4, "shard0", "Shard(0)"), (4, "shard1", "Shard(1)")]


def training_state(shape, layout: str) -> dict:
    weights = build_state(shape, layout)
    exp_avg, exp_avg_sq = build_state(shape, layout), build_state(shape, layout)
    return {
        "model": weights,
        "optimizer": {
            "state": {
                k: {"exp_avg": exp_avg[k], "exp_avg_sq": exp_avg_sq[k], "step": torch.tensor(100.0)} for k in weights
            },
            "param_groups": [
                {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(weights)}
            ],
        },
        "train_state": {"step": 100},
    }


def _op(name: str, state, out: str):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFSavePlanner, HFStorageWriter

    blocking: list[float] = []
    if name == "dcp_filesystem_writer":
        return (lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(out))), blocking

    def run():
        writer, planner = HFStorageWriter(out, overwrite=True), HFSavePlanner(model_prefix="model.")
        if name == "ours":
            dcp.save(state, storage_writer=writer, planner=planner)
            return
        t0 = time.perf_counter()
        future = dcp.async_save(state, storage_writer=writer, planner=planner)
        blocking.append(time.perf_counter() - t0)
        future.result()

    return run, blocking


def worker(rank: int, world: int, shape, layout: str, root: str, repeat: int):
    from benchmarks.measure import measured_save, rotated

    os.makedirs(root, exist_ok=True)
    state = training_state(shape, layout)
    samples: dict[str, list[dict]] = {op: [] for op in OPS}
    for r in range(repeat):
        for op in rotated(OPS, r):
            out = os.path.join(root, op)
            fn, blocking = _op(op, state, out)
            sample = measured_save(fn, out, root, rank)
            if blocking:
                sample["blocking_s"] = blocking[0]
            samples[op].append(sample)
    return samples


def run(root: str, size_gb: float, repeat: int) -> list[dict]:
    """``size_gb``: of the weights in bf16 (the state is about 3x that)."""
    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks

    shape = scaled_shape(size_gb)
    weights = sum(math.prod(s) for s in shape.tensors().values()) * 2
    nbytes = 3 * weights  # weights and two moments; the step tensors and objects are a few KB
    results = []
    for world, layout, name in SHARDINGS:
        case = f"training-state save, {world} ranks {name}"
        print(f"  running: {case} ...", flush=True)
        per_rank = run_ranks(worker, world, shape, layout, os.path.join(root, "save"), repeat, timeout=3600)
        result = {"case": case, "mode": "save", "world": world, "layout": layout, "state_bytes": nbytes, "ops": {}}
        for op in OPS:
            merged = [merge_ranks([r[op][i] for r in per_rank]) for i in range(repeat)]
            result["ops"][op] = summarize(merged, nbytes)
        blocking = [max(r["ours_async"][i]["blocking_s"] for r in per_rank) for i in range(repeat)]
        result["async_blocking_s"] = {"min": min(blocking), "median": statistics.median(blocking)}
        ours, dcp_fs = result["ops"]["ours"], result["ops"]["dcp_filesystem_writer"]
        print(
            f"    ours {ours['min_s']:.2f} s, ours_async {result['ops']['ours_async']['min_s']:.2f} s "
            f"(blocking {min(blocking):.2f} s), FileSystemWriter {dcp_fs['min_s']:.2f} s: "
            f"ratio {dcp_fs['min_s'] / ours['min_s']:.2f}x best, {dcp_fs['median_s'] / ours['median_s']:.2f}x median",
            flush=True,
        )
        results.append(result)
        shutil.rmtree(os.path.join(root, "save"), ignore_errors=True)
    return results
