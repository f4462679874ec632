"""Quantized benchmark: a dequantizing load of an FP8 block-scaled checkpoint (DeepSeek-V3
layout: fp8 weights + float32 ``weight_scale_inv`` per 128x128 block) into bf16 FSDP2 shards
(Shard(0)) on 2 and 4 ranks, against torch's ``QuantizedHuggingFaceStorageReader`` and against
"load the fp8 tensors with safetensors, then dequantize" (each rank loads whole tensors, as
offline scripts do, and keeps its shard). Outputs are checked equal. Besides time: bytes each
rank reads over the bytes its shard needs (fp8 rows + the scale blocks they touch)."""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

BLOCK = 128
# DeepSeek-V3-like linear shapes (rows, columns); rows not a multiple of the rank count's blocks.
SHAPES = ((7168, 2048), (2048, 7168), (1536, 7168), (7168, 1536), (576, 7168))


def make_checkpoint(path: str, size_gb: float, file_gb: float = 0.5) -> dict[str, tuple[int, int]]:
    """fp8 weights with their scales beside them, one file per ~0.5 GB, and config.json."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes, files, tensors, size, total = {}, {}, {}, 0, 0
    i = 0
    while total < size_gb * 1e9:
        rows, cols = SHAPES[i % len(SHAPES)]
        key = f"model.layers.{i // len(SHAPES)}.mlp.proj{i % len(SHAPES)}.weight"
        # Finite e4m3 values only (0x7f/0xff are NaN): magnitudes 0..0x7d, random sign.
        data = torch.randint(0, 0x7E, (rows, cols), dtype=torch.uint8, generator=g)
        data |= torch.randint(0, 2, (rows, cols), dtype=torch.uint8, generator=g) << 7
        tensors[key] = data.view(torch.float8_e4m3fn)
        tensors[key + "_scale_inv"] = torch.rand(-(-rows // BLOCK), -(-cols // BLOCK), generator=g) / 448
        shapes[key] = (rows, cols)
        size += rows * cols
        total += rows * cols
        i += 1
        if size > file_gb * 1e9 or total >= size_gb * 1e9:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
            files.update({k: name for k in tensors})
            tensors, size = {}, 0
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": files}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {
                "model_type": "deepseek_v3",
                "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]},
            },
            f,
        )
    return shapes


def _state(shapes, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {
        k: distribute_tensor(torch.empty(s, dtype=torch.bfloat16), mesh, [Shard(0)], src_data_rank=None)
        for k, s in shapes.items()
    }


def _needed(state) -> int:
    """Bytes this rank's shards need: its fp8 rows and the scale blocks they touch."""
    total = 0
    for t in state.values():
        chunk = t.__create_chunk_list__()[0]
        (r, _), (n, c) = chunk.offsets, chunk.sizes
        if n:
            total += n * c + 4 * ((r + n - 1) // BLOCK - r // BLOCK + 1) * -(-c // BLOCK)
    return total


def _op(name: str, state, path: str, shapes):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFStorageReader, detect_layout

    if name == "ours":
        reader = HFStorageReader(path)

        def run():
            dcp.load(state, storage_reader=reader, planner=HFLoadPlanner(detect_layout(path)))

        run.bytes_read = lambda: reader.bytes_read
        return run
    if name == "torch_quantized_reader":
        from torch.distributed.checkpoint.quantized_hf_storage import (
            QuantizedHuggingFaceStorageReader,
        )

        def run():
            dcp.load(
                state,
                storage_reader=QuantizedHuggingFaceStorageReader(path, target_dtype=torch.bfloat16, thread_count=1),
            )

        # By its code: each request's rows of the weight, and the whole scale tensor.
        run.bytes_read = lambda: sum(
            t.to_local().numel() + 4 * math.prod((-(-r // BLOCK), -(-c // BLOCK)))
            for t, (r, c) in zip(state.values(), shapes.values())
        )
        return run
    if name == "safetensors_then_dequantize":
        from safetensors import safe_open

        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            index = json.load(f)["weight_map"]

        def run():
            for key, dest in state.items():
                with safe_open(os.path.join(path, index[key]), "pt") as f:
                    w, s = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
                full = (
                    w.float() * s.repeat_interleave(BLOCK, 0)[: w.shape[0]].repeat_interleave(BLOCK, 1)[:, : w.shape[1]]
                ).to(torch.bfloat16)
                chunk = dest.__create_chunk_list__()[0]
                dest.to_local().copy_(full[chunk.offsets[0] : chunk.offsets[0] + chunk.sizes[0]])

        run.bytes_read = lambda: sum(r * c + 4 * -(-r // BLOCK) * -(-c // BLOCK) for r, c in shapes.values())
        return run
    raise ValueError(name)


def worker(rank: int, world: int, path: str, shapes, ops: list[str], repeat: int):
    import torch.distributed as dist

    from benchmarks.measure import measured, rotated

    torch.set_num_threads(1)  # one intra-op thread per rank, as torchrun sets for several ranks
    state = _state(shapes, world)
    needed = _needed(state)
    samples: dict[str, list[dict]] = {op: [] for op in ops}
    outputs = {}
    for r in range(repeat):
        for op in rotated(ops, r):
            for t in state.values():
                t.to_local().zero_()
            dist.barrier()
            fn = _op(op, state, path, shapes)
            sample = measured(fn)
            sample["read"] = fn.bytes_read()
            sample["needed"] = needed
            dist.barrier()
            samples[op].append(sample)
            if r == 0:
                outputs[op] = {k: t.to_local().flatten()[::997].clone() for k, t in state.items()}
    first = outputs[ops[0]]
    for op in ops[1:]:  # the same values from every operation (sampled every 997th element)
        bad = [k for k in first if not torch.equal(outputs[op][k].view(torch.int16), first[k].view(torch.int16))]
        if bad:
            raise AssertionError(
                f"rank {rank}: {op} loaded other values than {ops[0]} into {bad[:3]} ({len(bad)} tensors)"
            )
    return samples


def run(root: str, repeat: int, size_gb: float = 0.25, worlds=(2, 4)) -> list[dict]:
    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks

    path = os.path.join(root, "fp8")
    shapes = make_checkpoint(path, size_gb)
    os.sync()  # written back before any load is timed
    nbytes = sum(r * c for r, c in shapes.values())
    ops = ["ours", "torch_quantized_reader", "safetensors_then_dequantize"]
    results = []
    for world in worlds:
        print(f"  running: FP8 dequantizing load, {world} ranks Shard(0), {nbytes / 1e9:.2f} GB fp8 ...", flush=True)
        per_rank = run_ranks(worker, world, path, shapes, ops, repeat, timeout=3600)
        result = {
            "case": f"FP8 dequantizing load, {world} ranks Shard(0)",
            "mode": "load",
            "world": world,
            "state_bytes": nbytes,
            "ops": {},
            "read_per_rank_over_needed": {},
        }
        for op in ops:
            merged = [merge_ranks([r[op][i] for r in per_rank]) for i in range(repeat)]
            result["ops"][op] = summarize(merged, nbytes)
            result["read_per_rank_over_needed"][op] = max(r[op][0]["read"] / r[op][0]["needed"] for r in per_rank)
        results.append(result)
        ours = result["ops"]["ours"]["min_s"]
        print(
            "    "
            + ", ".join(
                f"{op}: {s['min_s']:.2f} s ({ours and s['min_s'] / ours:.2f}x), read/needed per rank "
                f"{result['read_per_rank_over_needed'][op]:.2f}, peak extra RSS "
                f"{s['peak_extra_rss_mib']:.0f} MiB"
                for op, s in result["ops"].items()
            ),
            flush=True,
        )
    shutil.rmtree(root, ignore_errors=True)
    return results
