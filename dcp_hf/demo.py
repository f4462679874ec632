"""The demo: a Llama-shaped model sharded over local processes, saved straight to an HF
checkpoint, loaded back under another sharding, verified bit for bit."""

from __future__ import annotations

import json
import os
import re
import time

import torch

from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape, pattern_chunk, tensor_parallel_dim

# Every name a demo output folder holds: its config, and one file or shards with their index.
DEMO_FILE = re.compile(r"^(config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors)$")
DEMO_SHAPES = (LlamaShape(), LLAMA_1B_LIKE)  # --size small, 1b


def is_demo_output(path: str) -> bool:
    """Whether ``path`` is a folder a previous demo wrote (the demo replaces it without
    --overwrite): it holds only config.json, model.safetensors, model.safetensors.index.json
    and model-NNNNN-of-NNNNN.safetensors files (nothing else, hidden names included), and its
    config.json is the one a demo of either size writes."""
    try:
        names = os.listdir(path)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        all(DEMO_FILE.match(n) for n in names)
        and any(n.endswith(".safetensors") for n in names)
        and any(config == shape.hf_config(torch.bfloat16) for shape in DEMO_SHAPES)
    )


def sharded_llama(shape: LlamaShape, dtype: torch.dtype, layout: str, empty: bool = False):
    """DTensors over all ranks: ``tp`` shards each weight as Megatron TP does (column-parallel
    rows, row-parallel columns), ``fsdp`` shards every tensor on dim 0. Each rank builds only
    its own chunk."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for key, full_shape in shape.tensors().items():
        dim = tensor_parallel_dim(key) if layout == "tp" and len(full_shape) > 1 else 0
        placements = [Shard(dim)]
        sizes, offsets = compute_local_shape_and_global_offset(full_shape, mesh, placements)
        local = (
            torch.empty(sizes, dtype=dtype)
            if empty
            else pattern_chunk(key, full_shape, tuple(offsets), tuple(sizes), dtype)
        )
        out[key] = DTensor.from_local(
            local,
            mesh,
            placements,
            shape=torch.Size(full_shape),
            stride=torch.empty(full_shape, device="meta").stride(),
        )
    return out


def _rank_save_then_load(
    rank: int,
    world: int,
    path: str,
    shape: LlamaShape,
    dtype: torch.dtype,
    max_shard_size: str,
    progress: bool,
    overwrite: bool,
):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter

    state = sharded_llama(shape, dtype, "tp")
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save(
        state,
        storage_writer=HFStorageWriter(
            path,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            config=shape.hf_config(dtype),
        ),
        planner=HFSavePlanner(),
    )
    save_s = time.perf_counter() - t0
    del state

    target = sharded_llama(shape, dtype, "fsdp", empty=True)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=HFStorageReader(path, progress=progress), planner=HFLoadPlanner())
    load_s = time.perf_counter() - t0
    wrong = []
    for key, value in target.items():
        chunk = value.__create_chunk_list__()[0]
        expected = pattern_chunk(key, tuple(value.shape), tuple(chunk.offsets), tuple(chunk.sizes), dtype)
        if not torch.equal(value.to_local().view(torch.uint8), expected.view(torch.uint8)):
            wrong.append(key)
    return save_s, load_s, wrong


def verify_plain(path: str, shape: LlamaShape, dtype: torch.dtype) -> int:
    """Check the output with the reference safetensors reader, one tensor at a time."""
    from safetensors import safe_open

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        weight_map = {k: "model.safetensors" for k in shape.tensors()}
    if set(weight_map) != set(shape.tensors()):
        raise AssertionError(f"{path}: keys differ from the model's")
    for key, file in weight_map.items():
        with safe_open(os.path.join(path, file), "pt") as f:
            t = f.get_tensor(key)
        expected = pattern_chunk(key, tuple(t.shape), (0,) * t.dim(), tuple(t.shape), dtype)
        if not torch.equal(t.view(torch.uint8), expected.view(torch.uint8)):
            raise AssertionError(f"{path}/{file}: {key} differs from what was saved")
    return len(weight_map)


def run_demo(
    output: str, nproc: int, shape: LlamaShape, max_shard_size: str, progress: bool = False, overwrite: bool = False
) -> None:
    """Save, reload resharded and verify the demo model in ``output``; a checkpoint already
    there is replaced only with ``overwrite`` (the command line passes it for a previous demo
    output, :func:`is_demo_output`)."""
    from dcp_hf.local_ranks import run_ranks

    dtype = torch.bfloat16
    nbytes = sum(torch.Size(s).numel() for s in shape.tensors().values()) * dtype.itemsize
    print(f"dcp-hf demo: Llama-shaped model {shape.describe()}, {nbytes / 1e6:.1f} MB bf16, {nproc} processes (gloo)")
    print(f"  save: tensor-parallel DTensors (column/row sharded) -> HF checkpoint in {output}")
    results = run_ranks(_rank_save_then_load, nproc, output, shape, dtype, max_shard_size, progress, overwrite)
    save_s = max(r[0] for r in results)
    load_s = max(r[1] for r in results)
    wrong = sorted({k for r in results for k in r[2]})
    if wrong:
        raise SystemExit(f"FAILED: loaded tensors differ from the saved ones: {wrong[:5]}")
    count = verify_plain(output, shape, dtype)
    files = sorted(os.listdir(output))
    print(f"  files: {', '.join(files)}")
    print(
        f"  save {nbytes / save_s / 1e9:.2f} GB/s ({save_s:.2f} s); load resharded to FSDP "
        f"Shard(0): {nbytes / load_s / 1e9:.2f} GB/s ({load_s:.2f} s)"
    )
    print(f"  verified: {count} tensors bit-exact after reload, and with safetensors.safe_open")
    print(f"  load it with transformers: AutoModelForCausalLM.from_pretrained({output!r})")
