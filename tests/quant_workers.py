"""Quantized checkpoints for tests: plain-torch references (block by block, independent of
dcp_hf.layouts.quantized) and functions run on each rank."""

from __future__ import annotations

import json
import os
import re

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from dcp_hf import HFLoadPlanner, HFStorageReader, detect_layout
from dcp_hf.format import INDEX_NAME

FP8 = torch.float8_e4m3fn
BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}
# The linear weights DeepSeek-V3's release stores in FP8 (not norms, embeddings, router, lm_head).
DSV3_QUANTIZED = re.compile(
    r".*layers\.\d+\.(self_attn\.(q_a|q_b|kv_a|kv_b|o)_proj(_with_mqa)?|"
    r"mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)\.weight"
)


def quantize_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block: scale = amax(|block|) / 448, data = block / scale in fp8."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // block), -(-cols // block))
    data = torch.empty(rows, cols, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s = blk.abs().max() / 448.0
            s = s if s > 0 else torch.tensor(1.0)
            scale[i, j] = s
            data[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s).to(FP8)
    return data, scale


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, dtype, block: int = BLOCK) -> torch.Tensor:
    """The released formula, block by block: (weight.float() * scale).to(dtype)."""
    out = torch.empty(data.shape, dtype=dtype)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rs, cs] = (data[rs, cs].float() * scale[i, j]).to(dtype)
    return out


def write_checkpoint(path: str, files: dict[str, dict[str, torch.Tensor]], config: dict | None) -> None:
    """``files``: file name -> tensors; writes the index (and config.json)."""
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, os.path.join(path, name))
        weight_map.update({k: name for k in tensors})
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)


def placements(kind: str, ndim: int, world: int):
    """A mesh and placements for ``kind``: FSDP2's Shard(0), Shard(1), or a 2-D mesh."""
    if kind == "2d":
        mesh = init_device_mesh("cpu", (2, world // 2))
        return mesh, [Shard(0), Shard(ndim - 1)]
    mesh = init_device_mesh("cpu", (world,))
    return mesh, [Shard(0 if kind == "shard0" else min(1, ndim - 1))]


def _zeros_like_sharded(shapes: dict, kind: str, world: int) -> dict:
    out = {}
    for key, (shape, dtype) in shapes.items():
        mesh, pl = placements(kind, len(shape), world)
        out[key] = distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, pl, src_data_rank=None)
    return out


def load_sharded(rank: int, world: int, path: str, expected_file: str, kinds: list[str]) -> list[str]:
    """Load the quantized checkpoint into DTensor shards of every kind, twice: the in-memory
    keys through ``detect_layout`` (fused experts, dequantized) against the reference, and the
    HF keys of the quantized weights with our planner and with torch's
    ``QuantizedHuggingFaceStorageReader`` against each other. Returns the mismatches."""
    from torch.distributed.checkpoint.quantized_hf_storage import (
        QuantizedHuggingFaceStorageReader,
    )

    expected = torch.load(expected_file)
    memory, hf_fp8 = expected["memory"], expected["hf_fp8"]
    bad = []
    for kind in kinds:
        sd = _zeros_like_sharded({k: (v.shape, v.dtype) for k, v in memory.items()}, kind, world)
        reader = HFStorageReader(path)
        dcp.load(sd, storage_reader=reader, planner=HFLoadPlanner(detect_layout(path)))
        for key, t in sd.items():
            ref = distribute_tensor(memory[key], t.device_mesh, t.placements, src_data_rank=None)
            if not torch.equal(t.to_local().view(torch.uint8), ref.to_local().view(torch.uint8)):
                bad.append(f"{kind} rank {rank}: {key}")
        ours = _zeros_like_sharded({k: (s, torch.bfloat16) for k, s in hf_fp8.items()}, kind, world)
        theirs = _zeros_like_sharded({k: (s, torch.bfloat16) for k, s in hf_fp8.items()}, kind, world)
        dcp.load(
            ours,
            storage_reader=HFStorageReader(path),
            planner=HFLoadPlanner(detect_layout(path), allow_unexpected=True),
        )
        dcp.load(theirs, storage_reader=QuantizedHuggingFaceStorageReader(path, target_dtype=torch.bfloat16))
        for key in ours:
            a, b = ours[key].to_local(), theirs[key].to_local()
            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                bad.append(f"{kind} rank {rank}: {key} differs from torch's quantized reader")
        dist.barrier()
    return bad


def save_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """A small model state: two quantized linear weights (partial edge blocks), a norm, a router."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(300, 200, generator=g) * 2).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(130, 260, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 200, generator=g),
        "model.norm.weight": torch.randn(200, generator=g).to(torch.bfloat16),
    }


def save_quantized(rank: int, world: int, root: str, kinds: list[str]) -> None:
    """Save ``save_state`` sharded by each of ``kinds`` (into ``root/kind``) through an FP8
    block-quantizing layout."""
    from dcp_hf import HFSavePlanner, HFStorageWriter, Layout
    from dcp_hf.layouts.quantized import BlockFP8, quantized_config

    layout = Layout(quantization=BlockFP8())
    for kind in kinds:
        sd = {}
        for key, v in save_state().items():
            mesh, pl = placements(kind, v.dim(), world)
            sd[key] = distribute_tensor(v, mesh, pl, src_data_rank=None)
        path = os.path.join(root, kind)
        config = quantized_config(layout.quantization, {"model_type": "llama"})
        dcp.save(sd, storage_writer=HFStorageWriter(path, config=config), planner=HFSavePlanner(layout))


def megatron_load(rank: int, world: int, fp8_dir: str, reference_dir: str) -> list[str]:
    """A DeepSeek-V3 Megatron model at TP2/EP2 loads the FP8 release (dequantized) exactly as it
    loads the block-wise dequantized reference checkpoint. Returns the parameters that differ."""
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import Parallel, build_gpt, init_parallel

    with open(os.path.join(reference_dir, "config.json")) as f:
        hf = json.load(f)
    init_parallel(Parallel(tp=2, ep=2))
    want, got = build_gpt(hf, Parallel(tp=2, ep=2)), build_gpt(hf, Parallel(tp=2, ep=2), seed=1)
    dmeg.load_hf(want, reference_dir)
    dmeg.load_hf(got, fp8_dir)  # the quantization comes from the release's config.json
    a = {f"{i}.{k}": p for i, c in enumerate(want) for k, p in c.named_parameters()}
    b = {f"{i}.{k}": p for i, c in enumerate(got) for k, p in c.named_parameters()}
    return [k for k in a if not torch.equal(a[k].detach().view(torch.uint8), b[k].detach().view(torch.uint8))]
