"""Planning at DeepSeek-V3 scale, by simulation in one process: meta tensors (no data), every
simulated rank's local plan made by the real planner and writer, the coordinator's global plan
made from all of them, and the plan messages measured as DCP would send them (pickled).

Two layouts of the same DeepSeek-V3-671B-shaped model (61 layers, 256 routed + 1 shared
expert, MLA; HF key names, fp8 weights with their ``weight_scale_inv`` as in the released
checkpoint):

- ``fsdp``: every HF tensor ``Shard(0)`` over all ranks (FSDP2's even split, torch.chunk
  sizes), as DTensor shards present themselves to DCP (one box per tensor per rank);
- ``megatron``: the Megatron-core model's sharded tensors at TP2/PP16/EP32 (bf16, Megatron
  keys, saved through the Megatron layout, main replicas only, as ``dcp_hf.megatron.save_hf``).

Also timed: reading the index and every header of such a checkpoint (written once with empty
tensor data: a sparse file per shard, headers real).
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import shutil
import statistics
import time

import torch

from dcp_hf.tensor_box import TensorBox

HIDDEN, VOCAB, LAYERS, DENSE, EXPERTS, FFN, MOE_FFN = 7168, 129280, 61, 3, 256, 18432, 2048
Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V_DIM = 1536, 512, 128, 128, 64, 128
FP8, BLOCK = torch.float8_e4m3fn, 128


def dsv3_hf_specs() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF key -> (shape, dtype) of the released DeepSeek-V3 checkpoint (without the MTP layer)."""
    out = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), torch.bfloat16)}

    def linear(key, rows, cols):
        out[key + ".weight"] = ((rows, cols), FP8)
        out[key + ".weight_scale_inv"] = ((math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), torch.float32)

    def mlp(prefix, ffn):
        linear(prefix + "gate_proj", ffn, HIDDEN)
        linear(prefix + "up_proj", ffn, HIDDEN)
        linear(prefix + "down_proj", HIDDEN, ffn)

    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ((HIDDEN,), torch.bfloat16)
        out[p + "post_attention_layernorm.weight"] = ((HIDDEN,), torch.bfloat16)
        linear(p + "self_attn.q_a_proj", Q_LORA, HIDDEN)
        out[p + "self_attn.q_a_layernorm.weight"] = ((Q_LORA,), torch.bfloat16)
        linear(p + "self_attn.q_b_proj", HEADS * (NOPE + ROPE), Q_LORA)
        linear(p + "self_attn.kv_a_proj_with_mqa", KV_LORA + ROPE, HIDDEN)
        out[p + "self_attn.kv_a_layernorm.weight"] = ((KV_LORA,), torch.bfloat16)
        linear(p + "self_attn.kv_b_proj", HEADS * (NOPE + V_DIM), KV_LORA)
        linear(p + "self_attn.o_proj", HIDDEN, HEADS * V_DIM)
        if i < DENSE:
            mlp(p + "mlp.", FFN)
            continue
        out[p + "mlp.gate.weight"] = ((EXPERTS, HIDDEN), torch.bfloat16)
        out[p + "mlp.gate.e_score_correction_bias"] = ((EXPERTS,), torch.float32)
        for e in range(EXPERTS):
            mlp(p + f"mlp.experts.{e}.", MOE_FFN)
        mlp(p + "mlp.shared_experts.", MOE_FFN)
    out["model.norm.weight"] = ((HIDDEN,), torch.bfloat16)
    out["lm_head.weight"] = ((VOCAB, HIDDEN), torch.bfloat16)
    return out


def _box(shape, dtype, offsets, sizes) -> TensorBox:
    return TensorBox(torch.empty(sizes, dtype=dtype, device="meta"), offsets, shape)


def fsdp_state(specs, rank: int, world: int) -> dict[str, TensorBox]:
    """FSDP2 Shard(0): rank r holds rows [r*c, (r+1)*c) with c = ceil(rows / world) (empty
    beyond the last row, which DCP does not save)."""
    out = {}
    for key, (shape, dtype) in specs.items():
        c = -(-shape[0] // world)
        lo, hi = min(rank * c, shape[0]), min((rank + 1) * c, shape[0])
        if hi > lo:
            out[key] = _box(shape, dtype, (lo,) + (0,) * (len(shape) - 1), (hi - lo,) + shape[1:])
    return out


def megatron_parallel(world: int) -> tuple[int, int, int, int]:
    """(TP, PP, EP, ETP): TP2/PP16/EP32 from 512 ranks on, EP as large as fits below."""
    return 2, 16, min(32, world // 16), 1


def megatron_state(rank: int, world: int) -> dict[str, TensorBox]:
    """The main-replica sharded tensors of a Megatron-core DeepSeek-V3 model on ``rank``, as
    ``sharded_state_dict(metadata={"singleton_local_shards": True})`` gives them (bf16)."""
    tp, pp, ep, etp = megatron_parallel(world)
    dp = world // (tp * pp)
    edp = world // (etp * ep * pp)
    tp_r, dp_r, pp_r = rank % tp, rank // tp % dp, rank // (tp * dp)
    etp_r, ep_r, edp_r = rank % etp, rank // etp % ep, rank // (etp * ep) % edp
    bf16, out = torch.bfloat16, {}
    per_stage = -(-LAYERS // pp)
    layers = range(pp_r * per_stage, min(LAYERS, (pp_r + 1) * per_stage))

    def add(key, shape, dim=None, parts=tp, part=tp_r):
        if dim is None:
            out[key] = _box(shape, bf16, (0,) * len(shape), shape)
            return
        size = shape[dim] // parts
        offsets = tuple(part * size if d == dim else 0 for d in range(len(shape)))
        sizes = tuple(size if d == dim else n for d, n in enumerate(shape))
        out[key] = _box(shape, bf16, offsets, sizes)

    if dp_r == 0:  # dense parameters: the main replica is DP rank 0
        if pp_r == 0:
            add("embedding.word_embeddings.weight", (VOCAB, HIDDEN), 0)
        if pp_r == pp - 1:
            add("decoder.final_layernorm.weight", (HIDDEN,))
            add("output_layer.weight", (VOCAB, HIDDEN), 0)
        for i in layers:
            p = f"decoder.layers.{i}."
            a = p + "self_attention."
            add(p + "input_layernorm.weight", (HIDDEN,))
            add(a + "linear_q_down_proj.weight", (Q_LORA, HIDDEN))
            add(a + "linear_q_up_proj.layer_norm_weight", (Q_LORA,))
            add(a + "linear_q_up_proj.weight", (HEADS * (NOPE + ROPE), Q_LORA), 0)
            add(a + "linear_kv_down_proj.weight", (KV_LORA + ROPE, HIDDEN))
            add(a + "linear_kv_up_proj.layer_norm_weight", (KV_LORA,))
            add(a + "linear_kv_up_proj.weight", (HEADS * (NOPE + V_DIM), KV_LORA), 0)
            add(a + "linear_proj.weight", (HIDDEN, HEADS * V_DIM), 1)
            add(p + "pre_mlp_layernorm.weight", (HIDDEN,))
            if i < DENSE:
                add(p + "mlp.linear_fc1.weight_w", (FFN, HIDDEN), 0)
                add(p + "mlp.linear_fc1.weight_v", (FFN, HIDDEN), 0)
                add(p + "mlp.linear_fc2.weight", (HIDDEN, FFN), 1)
                continue
            add(p + "mlp.router.weight", (EXPERTS, HIDDEN))
            add(p + "mlp.router.expert_bias", (EXPERTS,))
            add(p + "mlp.shared_experts.linear_fc1.weight_w", (MOE_FFN, HIDDEN), 0)
            add(p + "mlp.shared_experts.linear_fc1.weight_v", (MOE_FFN, HIDDEN), 0)
            add(p + "mlp.shared_experts.linear_fc2.weight", (HIDDEN, MOE_FFN), 1)
    if edp_r == 0:  # experts: the main replica is expert-DP rank 0
        local = EXPERTS // ep
        for i in layers:
            if i < DENSE:
                continue
            for le in range(local):
                p = f"decoder.layers.{i}.mlp.experts.experts.{ep_r * local + le}."
                add(p + "linear_fc1.weight_w", (MOE_FFN, HIDDEN), 0, etp, etp_r)
                add(p + "linear_fc1.weight_v", (MOE_FFN, HIDDEN), 0, etp, etp_r)
                add(p + "linear_fc2.weight", (HIDDEN, MOE_FFN), 1, etp, etp_r)
    return out


def _megatron_layout():
    from dcp_hf.layouts.megatron import MegatronGPT, megatron_layout

    return megatron_layout(
        MegatronGPT(
            num_attention_heads=HEADS, num_query_groups=HEADS, head_dim=NOPE + ROPE, vocab_size=VOCAB, attention="mla"
        )
    )


def simulate(kind: str, world: int, root: str, max_shard_size: str) -> dict:
    """Every rank's local plan, then the global plan, as ``dcp.save`` makes them; then what a
    rank does with its part of the global plan before writing (the file layout)."""
    from dcp_hf import HFStorageWriter
    from testkit.simulate import simulate_save_plans

    specs = dsv3_hf_specs() if kind == "fsdp" else None
    states = (
        fsdp_state(specs, rank, world) if kind == "fsdp" else megatron_state(rank, world) for rank in range(world)
    )
    out = os.path.join(root, "out")
    sim = simulate_save_plans(
        states, out, _megatron_layout() if kind == "megatron" else None, max_shard_size=max_shard_size
    )
    gathered = [len(pickle.dumps(p)) for p in sim.local_plans]
    scattered = [len(pickle.dumps(p)) for p in sim.global_plans]
    last = pickle.loads(pickle.dumps(sim.global_plans[-1])).storage_data  # as it arrives there
    writer = sim.coordinator[1]
    counts = {
        "chunks": sum(b.count for p in sim.local_plans for b in p.planner_data.blocks),
        "tensors": len(writer._where),
        "files": len(writer._files),
        "local_plan_s_max": max(sim.local_seconds),
        "local_plan_s_median": statistics.median(sim.local_seconds),
        "global_plan_s": sim.global_seconds,
    }
    # A real rank holds its own plan only: free the simulation's millions of objects first, or
    # the garbage collector walks them during the timed layout (3.6 s instead of 0.65 s).
    del sim, writer, states
    gc.collect()
    t0 = time.perf_counter()
    HFStorageWriter(out, max_shard_size=max_shard_size)._lay_out(last.table, last.save_id)
    rank_layout_s = time.perf_counter() - t0
    return {
        "layout": kind,
        "ranks": world,
        **counts,
        "rank_layout_s": rank_layout_s,
        "gathered_bytes": sum(gathered),
        "largest_local_plan_bytes": max(gathered),
        "scattered_bytes": sum(scattered),
        "largest_global_plan_bytes": max(scattered),
    }


def read_headers(root: str, max_shard_size: str) -> dict:
    """Time what a load starts with on such a checkpoint: the index json, then every file's
    header (one process; each rank of a load reads the index and the headers it needs). The
    checkpoint is written with real headers and no tensor data (sparse files)."""
    from dcp_hf import HFStorageReader
    from dcp_hf.format import INDEX_NAME, TensorSpec, encode_index, layout_files, natural_key, parse_size

    specs = sorted(
        (TensorSpec(k, dtype, shape) for k, (shape, dtype) in dsv3_hf_specs().items()), key=lambda s: natural_key(s.key)
    )
    files = layout_files(specs, parse_size(max_shard_size))
    path = os.path.join(root, "dsv3-headers")
    os.makedirs(path, exist_ok=True)
    for f in files:
        with open(os.path.join(path, f.name), "wb") as out:
            out.write(f.header)
            out.truncate(f.size)
    weight_map = {key: f.name for f in files for key in f.offsets}
    with open(os.path.join(path, INDEX_NAME), "wb") as out:
        out.write(encode_index(sum(f.size - len(f.header) for f in files), weight_map))
    reader = HFStorageReader(path)
    t0 = time.perf_counter()
    reader.read_metadata()
    t1 = time.perf_counter()
    reader.load_headers(set(reader.weight_map.values()))
    t2 = time.perf_counter()
    return {
        "files": len(files),
        "tensors": len(weight_map),
        "index_s": t1 - t0,
        "headers_s": t2 - t1,
        "header_bytes": sum(len(f.header) for f in files),
        "checkpoint_bytes": sum(f.size for f in files),
    }


def load_plans(checkpoint: str, world: int = 1024) -> dict:
    """Loading the DeepSeek-V3 checkpoint into FSDP2 Shard(0) on ``world`` ranks: the first and
    last ranks' local load plans (time once the headers are read, and the bytes each sends: the
    compact plan vs DCP's item plan of the same rank). A rank's plan does not depend on the
    others', so a sample tells."""
    from torch.distributed.checkpoint.planner import LoadPlan

    from dcp_hf import HFLoadPlanner, HFStorageReader

    reader = HFStorageReader(checkpoint)
    metadata = reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))
    specs = dsv3_hf_specs()
    sample = (0, world - 1)
    seconds, compact, items = [], [], []
    for rank in sample:
        planner = HFLoadPlanner()
        t0 = time.perf_counter()
        planner.set_up_planner(fsdp_state(specs, rank, world), metadata, rank == 0)
        plan = planner.create_local_plan()
        seconds.append(time.perf_counter() - t0)
        compact.append(len(pickle.dumps(plan)))
        items.append(len(pickle.dumps(LoadPlan(planner._local_items))))
    return {
        "ranks": world,
        "sampled": list(sample),
        "local_plan_s_max": max(seconds),
        "compact_plan_bytes_max": max(compact),
        "item_plan_bytes_max": max(items),
    }


def run(
    root: str, ranks=(64, 128, 256, 512, 1024), kinds=("fsdp", "megatron"), max_shard_size: str = "4.3GB"
) -> tuple[list[dict], dict]:
    os.makedirs(root, exist_ok=True)
    rows = []
    try:
        for kind in kinds:
            for world in ranks:
                print(f"  simulating: {kind} on {world} ranks ...", flush=True)
                rows.append(simulate(kind, world, root, max_shard_size))
        print("  reading the index and headers of a DeepSeek-V3-shaped checkpoint ...", flush=True)
        read = read_headers(root, max_shard_size)
        print("  load plans of sampled ranks ...", flush=True)
        read["load_plans"] = load_plans(os.path.join(root, "dsv3-headers"), max(ranks))
        return rows, read
    finally:
        shutil.rmtree(root, ignore_errors=True)
