"""Block digests (issue 24, case 6): what recording them costs a save, what checking them
costs a load, side by side in the same processes, alternating. Saves: ours (digests, the
default) against ours with ``digests=False``; loads of the same checkpoint: ours against ours
with ``verify=True``; ``dcp-hf verify`` of the whole checkpoint against reading its files
(4 MiB reads, nothing checked). Ratio = without / with: 1.00 means it costs nothing, 0.90
that the operation takes 1/0.9 as long. The files are 5 per checkpoint (a single-file save
has no index, so no digests)."""

from __future__ import annotations

import math
import os
import shutil

from benchmarks.core import build_state, scaled_shape

SAVE_OPS = ["ours", "ours_no_digests"]
LOAD_OPS = ["ours", "ours_verify"]
VERIFY_OPS = ["dcp_hf_verify", "read_files"]
CASES = [
    ("save", 1, "full", "1 process"),
    ("save", 2, "shard0", "2 ranks Shard(0)"),
    ("save", 2, "shard1", "2 ranks Shard(1)"),
    ("load", 1, "full", "1 process"),
    ("load", 2, "shard0", "2 ranks Shard(0)"),
    ("load", 2, "shard1", "2 ranks Shard(1)"),
]


def _shard_size(nbytes: int) -> int:
    return max(1 << 20, nbytes // 5)


def _op(mode: str, name: str, state, path: str, shard_size: int):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter

    if mode == "save":
        writer = HFStorageWriter(path, max_shard_size=shard_size, overwrite=True, digests=name == "ours")
        return lambda: dcp.save(state, storage_writer=writer, planner=HFSavePlanner())
    reader = HFStorageReader(path, verify=name == "ours_verify")
    return lambda: dcp.load(state, storage_reader=reader, planner=HFLoadPlanner())


def worker(rank: int, world: int, mode: str, shape, layout: str, root: str, repeat: int, shard_size: int):
    import torch.distributed as dist

    from benchmarks.measure import measured, measured_save, rotated

    state = build_state(shape, layout, empty=mode == "load")
    ops = SAVE_OPS if mode == "save" else LOAD_OPS
    samples: dict[str, list[dict]] = {op: [] for op in ops}
    for r in range(repeat):
        for op in rotated(ops, r):
            if mode == "save":
                out = os.path.join(root, op)
                samples[op].append(measured_save(_op(mode, op, state, out, shard_size), out, root, rank))
            else:
                fn = _op(mode, op, state, os.path.join(root, "checkpoint"), shard_size)
                dist.barrier()
                samples[op].append(measured(fn))
                dist.barrier()
    return samples


def _read_files(path: str) -> None:
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb", buffering=0) as f:
            while f.read(4 << 20):
                pass


def _verify_case(path: str, repeat: int, nbytes: int) -> dict:
    from benchmarks.measure import measured, rotated, summarize
    from dcp_hf.verify import OK, verify_checkpoint

    samples: dict[str, list[dict]] = {op: [] for op in VERIFY_OPS}
    for r in range(repeat):
        for op in rotated(VERIFY_OPS, r):
            if op == "dcp_hf_verify":
                reports: list = []
                samples[op].append(measured(lambda: reports.extend(verify_checkpoint(path))))
                assert all(rep.status == OK for rep in reports), [rep.line() for rep in reports]
            else:
                samples[op].append(measured(lambda: _read_files(path)))
    return {
        "case": "dcp-hf verify, 1 process",
        "mode": "verify",
        "world": 1,
        "layout": "full",
        "state_bytes": nbytes,
        "ops": {op: summarize(s, nbytes) for op, s in samples.items()},
    }


def _write_checkpoint(rank, world, shape, path, shard_size):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFSavePlanner, HFStorageWriter

    state = build_state(shape, "full")
    dcp.save(state, storage_writer=HFStorageWriter(path, max_shard_size=shard_size), planner=HFSavePlanner())


def run(root: str, size_gb: float, repeat: int) -> list[dict]:
    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks

    shape = scaled_shape(size_gb)
    nbytes = sum(math.prod(s) for s in shape.tensors().values()) * 2
    shard_size = _shard_size(nbytes)
    os.makedirs(root, exist_ok=True)
    run_ranks(_write_checkpoint, 1, shape, os.path.join(root, "checkpoint"), shard_size, timeout=3600)
    results = []
    for mode, world, layout, name in CASES:
        case = f"{'save' if mode == 'save' else 'load'} with digests, {name}"
        print(f"  running: {case} ...", flush=True)
        per_rank = run_ranks(worker, world, mode, shape, layout, root, repeat, shard_size, timeout=3600)
        ops = SAVE_OPS if mode == "save" else LOAD_OPS
        result = {"case": case, "mode": mode, "world": world, "layout": layout, "state_bytes": nbytes, "ops": {}}
        for op in ops:
            merged = [merge_ranks([r[op][i] for r in per_rank]) for i in range(repeat)]
            result["ops"][op] = summarize(merged, nbytes)
        results.append(result)
        _print(result, ops)
    result = _verify_case(os.path.join(root, "checkpoint"), repeat, nbytes)
    results.append(result)
    _print(result, VERIFY_OPS)
    for op in SAVE_OPS:
        shutil.rmtree(os.path.join(root, op), ignore_errors=True)
    return results


def _print(result: dict, ops: list[str]) -> None:
    """The digests' op (ours, with digests or verifying) against the plain one: plain / with."""
    plain, checked = (ops[1], ops[0]) if result["mode"] == "save" else (ops[0], ops[1])
    if result["mode"] == "verify":
        plain, checked = "read_files", "dcp_hf_verify"
    a, b = result["ops"][plain], result["ops"][checked]
    print(
        f"    {checked} {b['min_s']:.3f} s best / {b['median_s']:.3f} s median ({b['gbps']:.2f} GB/s), "
        f"{plain} {a['min_s']:.3f} / {a['median_s']:.3f} s: ratio {a['min_s'] / b['min_s']:.2f}x best, "
        f"{a['median_s'] / b['median_s']:.2f}x median",
        flush=True,
    )
