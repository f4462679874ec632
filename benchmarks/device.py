"""CUDA state dicts: save and load a bf16 state held on the GPUs (Llama-like shapes, about
4 GB), ours against DCP's FileSystemWriter/Reader (sync, and ``dcp.async_save`` with DCP's
pinned-memory DefaultStager) and torch's HuggingFaceStorageWriter/Reader.

    python -m benchmarks.device [--size-gb 4] [--repeat 1] [--dir SCRATCH]
    python benchmarks/device.py --cpu      # smoke run on CPU tensors, tiny state

Cases: 1 process (full tensors on GPU 0), then every local GPU (at least 2 ranks: ranks share
a GPU when there are fewer) with Shard(0) and with Shard(1) DTensors on a cuda mesh (a gloo
process group: DCP's collectives carry CPU objects; gloo also serves ``async_save``, which
needs a CPU backend). Every case runs ours and its baselines on the same state in the same
processes, alternating; the table's ratio is the baseline's time / ours (> 1: we are
faster). Loads read warm files (page cache) into zeroed GPU tensors, and each op ends with
``torch.cuda.synchronize()``. ``dcp_async_pinned`` is timed until its upload completes
(staging + write), with one DefaultStager per process kept across repeats (its first save
also pins its buffers). About 3 minutes on one H200 with 16 cores at the default size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):  # python benchmarks/device.py: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.core import _load_op, _save_op, build_state, scaled_shape

SAVE_OPS_1 = ["ours", "dcp_filesystem_writer", "dcp_async_pinned", "torch_hf_writer"]
SAVE_OPS_N = ["ours", "dcp_filesystem_writer", "dcp_async_pinned", "torch_hf_writer_consolidated"]
LOAD_OPS = ["ours", "dcp_filesystem_reader", "torch_hf_reader"]


def _device(rank: int, kind: str) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _on_device(state: dict, device: torch.device) -> dict:
    """The state of :func:`benchmarks.core.build_state` moved to ``device`` (DTensors onto a
    mesh of that device type, same placements)."""
    if device.type == "cpu":
        return state
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    out, mesh = {}, None
    for key in list(state):
        t = state.pop(key)  # the CPU copy is freed as we go
        if isinstance(t, DTensor):
            mesh = mesh or init_device_mesh(device.type, tuple(t.device_mesh.shape))
            out[key] = DTensor.from_local(t.to_local().to(device), mesh, t.placements, shape=t.shape, stride=t.stride())
        else:
            out[key] = t.to(device)
    return out


def _stager(kind: str):
    """DCP's DefaultStager as a training job would keep it: pinned memory, non-blocking
    copies on a side stream (on CPU, the smoke run: plain copies)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    gpu = kind != "cpu"
    return DefaultStager(StagingOptions(gpu, False, gpu, gpu))


def _op(name: str, mode: str, state, root: str, world: int, stager):
    import torch.distributed.checkpoint as dcp

    out = os.path.join(root, name)
    if name == "dcp_async_pinned":

        def run():
            result = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(out), async_stager=stager)
            (getattr(result, "upload_completion", None) or result).result()

    elif name == "dcp_filesystem_reader":
        src = os.path.join(root, "checkpoint-dcp")

        def run():
            dcp.load(state, storage_reader=dcp.FileSystemReader(src))

    elif mode == "save":
        run = _save_op(name, state, out, world)
    else:
        run = _load_op(name, state, os.path.join(root, "checkpoint"))

    def synchronized():
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return synchronized


def worker(rank: int, world: int, mode: str, shape, layout: str, ops: list[str], root: str, repeat: int, kind: str):
    import torch.distributed as dist

    from benchmarks.measure import measured, rotated

    device = _device(rank, kind)
    state = _on_device(build_state(shape, layout, empty=mode == "load"), device)
    stager = _stager(kind) if "dcp_async_pinned" in ops else None
    samples: dict[str, list[dict]] = {op: [] for op in ops}
    try:
        for r in range(repeat):
            for op in rotated(ops, r):
                if rank == 0 and mode == "save":
                    shutil.rmtree(os.path.join(root, op), ignore_errors=True)
                    os.sync()
                fn = _op(op, mode, state, root, world, stager)
                dist.barrier()
                samples[op].append(measured(fn))
                dist.barrier()
    finally:
        if stager is not None:
            stager.close()
    return samples


def _write_references(rank: int, world: int, shape, root: str) -> None:
    """The load cases' checkpoints, from a CPU state: one HF checkpoint (ours; the HF readers
    read it) and one DCP checkpoint (FileSystemWriter)."""
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFSavePlanner, HFStorageWriter

    state = build_state(shape, "full")
    dcp.save(state, storage_writer=HFStorageWriter(os.path.join(root, "checkpoint")), planner=HFSavePlanner())
    dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(root, "checkpoint-dcp")))


def run(root: str, size_gb: float | None, repeat: int, kind: str = "cuda") -> list[dict]:
    """The cases at ``size_gb`` (None: the tiny demo shape, 40 MB, for smoke runs)."""
    import math

    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks
    from dcp_hf.models import LlamaShape

    shape = scaled_shape(size_gb) if size_gb else LlamaShape()
    nbytes = sum(math.prod(s) for s in shape.tensors().values()) * 2
    world = max(2, torch.cuda.device_count() if kind != "cpu" else 2)
    cases = [("1 process", 1, "full")] + [(f"{world} ranks {p}", world, p.lower()) for p in ("Shard(0)", "Shard(1)")]
    gpus = "" if kind == "cpu" else f" on {min(world, torch.cuda.device_count())} GPU(s)"
    print(f"benchmarks.device: {nbytes / 1e9:.2f} GB bf16 on {kind}{gpus}, scratch {root}", flush=True)
    results = []
    for mode in ("save", "load"):
        if mode == "load":
            run_ranks(_write_references, 1, shape, root, timeout=3600)
        for label, n, layout in cases:
            layout = layout.replace("(", "").replace(")", "")  # Shard(0) -> shard0, as build_state names it
            ops = LOAD_OPS if mode == "load" else SAVE_OPS_1 if n == 1 else SAVE_OPS_N
            name = f"{kind} {mode}, {label}"
            print(f"  running: {name} ...", flush=True)
            per_rank = run_ranks(worker, n, mode, shape, layout, ops, root, repeat, kind, timeout=3600)
            result = {"case": name, "mode": mode, "world": n, "layout": layout, "state_bytes": nbytes, "ops": {}}
            for op in ops:
                merged = [merge_ranks([r[op][i] for r in per_rank]) for i in range(repeat)]
                result["ops"][op] = summarize(merged, nbytes)
            results.append(result)
    shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=None, help="state size (default 4; with --cpu 0.04)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--cpu", action="store_true", help="smoke run on CPU tensors (staging forced), tiny state")
    parser.add_argument("--out", default=None, help="write the results JSON and report here (GPU runs)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit(
            "benchmarks.device: no CUDA device here (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a machine with a GPU, or pass --cpu for a smoke run"
        )
    if args.cpu:  # the staging pipeline runs on CPU tensors as it would on CUDA ones
        os.environ["DCP_HF_FORCE_STAGING"] = "1"
    from benchmarks.report import case_table

    size = args.size_gb if args.size_gb is not None else None if args.cpu else 4.0
    root = tempfile.mkdtemp(prefix="dcp-hf-device-", dir=args.dir)
    results = run(root, size, args.repeat, "cpu" if args.cpu else "cuda")
    print(case_table(results))
    if args.out:
        from benchmarks.measure import machine, write_results

        path = write_results(
            {"machine": machine(), "suite": "device", "size_gb": size, "results": results, "planning": []}, args.out
        )
        print(f"results: {path}")


if __name__ == "__main__":
    main()
