"""Core save/load benchmark (issue: HF safetensors as a DCP backend on local disk).

Every case runs ours and its baselines on the same state in the same processes, alternating,
``repeat`` times. The state has Llama-1B shapes (~2 GB in bf16 by default).
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape

SAVE_BASELINES_1 = ["safetensors_save_file", "torch_hf_writer"]
SAVE_BASELINES_N = ["torch_hf_writer_consolidated", "dcp_filesystem_writer"]
LOAD_BASELINES = ["safe_open_copy", "torch_hf_reader"]
# Not a library: the floor of positional reads (what ours does) on one process, for reference.
LOAD_FLOOR_1 = ["preadv_floor"]
SHARDINGS = [
    (2, "shard0", "Shard(0)"),
    (2, "shard1", "Shard(1)"),
    (4, "shard0", "Shard(0)"),
    (4, "shard1", "Shard(1)"),
    (4, "mesh2d", "2x2 mesh (Shard(0), Shard(1))"),
]


def scaled_shape(size_gb: float) -> LlamaShape:
    """Llama-1B-like shapes, with the layer count scaled to reach about ``size_gb``."""
    base = LLAMA_1B_LIKE
    per_layer = sum(math.prod(s) for k, s in base.tensors().items() if ".layers.0." in k) * 2
    fixed = sum(math.prod(s) for k, s in base.tensors().items() if ".layers." not in k) * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return LlamaShape(**{**base.describe(), "layers": layers})


def _fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Pseudo-random bytes at memcpy speed (a random 1 MiB block, rotated per copy)."""
    flat = t.view(-1).view(torch.uint8)
    block = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    for i, start in enumerate(range(0, flat.numel(), block.numel())):
        n = min(block.numel(), flat.numel() - start)
        flat[start : start + n] = block.roll(i * 4099)[:n]
    return t


def build_state(shape: LlamaShape, layout: str, empty: bool = False) -> dict[str, torch.Tensor]:
    """Plain tensors (``full``), DTensors sharded on dim 0 / dim 1 over all ranks, or on a 2 x N/2
    mesh (``mesh2d``: rows over one mesh dim, columns over the other); each rank allocates only
    its own chunk. ``empty``: zeroed destinations for loads."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out: dict[str, torch.Tensor] = {}
    world = dist.get_world_size() if layout != "full" else 1
    mesh = None if layout == "full" else init_device_mesh("cpu", (2, world // 2) if layout == "mesh2d" else (world,))
    for i, (key, full) in enumerate(shape.tensors().items()):
        if mesh is None:
            t = torch.empty(full, dtype=torch.bfloat16)
            out[key] = t.zero_() if empty else _fill(t, i)
            continue
        if layout == "mesh2d":  # rows over the first mesh dim, columns over the second
            placements = [Shard(0), Shard(min(1, len(full) - 1))]
        else:
            placements = [Shard(min(1 if layout == "shard1" else 0, len(full) - 1))]
        sizes, offsets = compute_local_shape_and_global_offset(full, mesh, placements)
        local = torch.empty(sizes, dtype=torch.bfloat16)
        # Load destinations are zero-filled: page faults on first touch are not I/O.
        local.zero_() if empty else _fill(local, i * 1000 + dist.get_rank())
        out[key] = DTensor.from_local(
            local, mesh, placements, shape=torch.Size(full), stride=torch.empty(full, device="meta").stride()
        )
    return out


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _save_op(name: str, state, out: str, world: int):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFSavePlanner, HFStorageWriter

    if name == "ours":
        return lambda: dcp.save(state, storage_writer=HFStorageWriter(out, overwrite=True), planner=HFSavePlanner())
    if name == "safetensors_save_file":
        from safetensors.torch import save_file

        def run():
            os.makedirs(out, exist_ok=True)
            save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
            _fsync_tree(out)

        return run
    if name.startswith("torch_hf_writer"):
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        distributed = name.endswith("consolidated")
        return lambda: dcp.save(
            state,
            storage_writer=HuggingFaceStorageWriter(
                out, save_distributed=distributed, enable_consolidation=distributed
            ),
        )
    if name == "dcp_filesystem_writer":
        return lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(out))
    raise ValueError(name)


def _load_op(name: str, state, src: str):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFStorageReader

    if name == "ours":
        reader = HFStorageReader(src)
        run = lambda: dcp.load(state, storage_reader=reader, planner=HFLoadPlanner())  # noqa: E731
        run.bytes_read = lambda: reader.bytes_read  # read syscalls and touched mapped spans
        return run
    if name == "torch_hf_reader":
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        return lambda: dcp.load(state, storage_reader=HuggingFaceStorageReader(src))
    if name == "safe_open_copy":
        from safetensors import safe_open

        def run():
            with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
                for key, dest in state.items():
                    if hasattr(dest, "to_local"):
                        chunk = dest.__create_chunk_list__()[0]
                        box = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
                        dest.to_local().copy_(f.get_slice(key)[box])
                    else:
                        dest.copy_(f.get_tensor(key))

        return run
    if name == "preadv_floor":
        return lambda: _preadv_floor(state, os.path.join(src, "model.safetensors"))
    raise ValueError(name)


def _preadv_floor(state: dict[str, torch.Tensor], path: str, piece: int = 32 << 20) -> None:
    """Full tensors read with ``os.preadv`` straight into their destinations, in pieces of
    ``piece`` bytes on one thread per core: no planning, checks or metadata beyond the header."""
    import json
    import struct
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(path, os.O_RDONLY)
    try:
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, n, 8))
        jobs = []
        for key, dest in state.items():
            start, end = header[key]["data_offsets"]
            mv = memoryview(dest.view(-1).view(torch.uint8).numpy())
            jobs += [(mv[o : o + piece], 8 + n + start + o) for o in range(0, end - start, piece)]
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(lambda job: os.preadv(fd, [job[0]], job[1]), jobs))
    finally:
        os.close(fd)


def worker(
    rank: int, world: int, mode: str, shape: LlamaShape, layout: str, ops: list[str], root: str, repeat: int, cold: bool
):
    import torch.distributed as dist

    from benchmarks.measure import disk_bytes_written, drop_page_cache, measured, rotated

    os.makedirs(root, exist_ok=True)
    state = build_state(shape, layout, empty=mode == "load")
    samples: dict[str, list[dict]] = {op: [] for op in ops}
    for r in range(repeat):
        for op in rotated(ops, r):
            out = os.path.join(root, op)
            if rank == 0 and mode == "save":
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
            if rank == 0 and mode == "load" and cold:
                drop_page_cache()
            disk0 = disk_bytes_written(root) if rank == 0 else None
            dist.barrier()
            fn = (
                _save_op(op, state, out, world)
                if mode == "save"
                else _load_op(op, state, os.path.join(root, "checkpoint"))
            )
            sample = measured(fn)
            if hasattr(fn, "bytes_read"):
                sample["read"] = fn.bytes_read()
            dist.barrier()
            if disk0 is not None:  # physical bytes, after a sync (not timed) for writers that skip fsync
                os.sync()
                sample["disk_written"] = disk_bytes_written(root) - disk0
            samples[op].append(sample)
    return samples


def run_case(
    name: str,
    mode: str,
    world: int,
    shape: LlamaShape,
    layout: str,
    ops: list[str],
    root: str,
    repeat: int,
    cold: bool = False,
) -> dict:
    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks

    per_rank = run_ranks(worker, world, mode, shape, layout, ops, root, repeat, cold, timeout=3600)
    nbytes = sum(math.prod(s) for s in shape.tensors().values()) * 2
    result = {"case": name, "mode": mode, "world": world, "layout": layout, "state_bytes": nbytes, "ops": {}}
    for op in ops:
        merged = [merge_ranks([r[op][i] for r in per_rank]) for i in range(repeat)]
        result["ops"][op] = summarize(merged, nbytes)
    return result


def write_reference_checkpoint(shape: LlamaShape, root: str) -> None:
    """One HF checkpoint (single file, as the baselines expect) for the load cases."""
    from dcp_hf.local_ranks import run_ranks

    run_ranks(_write_reference, 1, shape, os.path.join(root, "checkpoint"), timeout=3600)


def _write_reference(rank, world, shape, path):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFSavePlanner, HFStorageWriter

    dcp.save(build_state(shape, "full"), storage_writer=HFStorageWriter(path, overwrite=True), planner=HFSavePlanner())


def run(root: str, size_gb: float, repeat: int, cold: bool, only: str | None = None) -> list[dict]:
    """``only``: run just the cases whose name contains it."""
    shape = scaled_shape(size_gb)
    cases = [("save, 1 process", "save", 1, "full", ["ours"] + SAVE_BASELINES_1)]
    cases += [
        (f"save, {world} ranks {name}", "save", world, layout, ["ours"] + SAVE_BASELINES_N)
        for world, layout, name in SHARDINGS
    ]
    results = []
    for name, mode, world, layout, ops in cases:
        if only and only not in name:
            continue
        print(f"  running: {name} ...", flush=True)
        results.append(run_case(name, mode, world, shape, layout, ops, os.path.join(root, "save"), repeat))
        shutil.rmtree(os.path.join(root, "save"), ignore_errors=True)
    loads = [("load full, 1 process", 1, "full")] + [
        (f"load resharded, {world} ranks {name}", world, layout) for world, layout, name in SHARDINGS
    ]
    loads = [case for case in loads if not only or only in case[0]]
    if loads:
        write_reference_checkpoint(shape, root)
    for name, world, layout in loads:
        print(f"  running: {name} ...", flush=True)
        ops = ["ours"] + LOAD_BASELINES + (LOAD_FLOOR_1 if layout == "full" else [])
        results.append(run_case(name, "load", world, shape, layout, ops, root, repeat, cold))
    shutil.rmtree(root, ignore_errors=True)
    return results
