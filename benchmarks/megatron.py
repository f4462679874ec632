"""Megatron benchmark: a Megatron-core MoE model on 4 processes (TP2/PP2/EP2/ETP1) exported to
an HF checkpoint and imported back; and that HF checkpoint turned into a Megatron ``torch_dist``
checkpoint, offline by ``import_hf`` beside "load it into the built model, then
``dist_checkpointing.save``" (see ``_to_torch_dist``).

Ours: ``dcp_hf.megatron.save_hf``/``load_hf`` (every rank writes and reads its own slice of the
final files). Baseline: the gather-to-rank-0 conversion that Megatron-Bridge/mbridge-style
converters do, written the straightforward way: on export every TP/EP shard is sent to rank 0,
which joins the full tensor, converts it to HF names and shapes and writes the files one after
another (each flushed at ``max_shard_size``, so it holds one file's tensors, not the model); on
import rank 0 reads each HF tensor, builds the Megatron tensor and sends every rank its slice.
Both run on the same model in the same processes; the outputs are checked equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from dcp_hf.megatron.build import Parallel

LAYOUT = Parallel(tp=2, pp=2, ep=2, etp=1)
MAX_SHARD = 256 << 20


def hf_config(size_gb: float) -> dict:
    """A Qwen3-MoE config (hidden 1024, 32 experts of FFN 512) with the layer count set to
    reach about ``size_gb`` in bf16."""
    hidden, experts, ffn, vocab, heads, groups, d = 1024, 32, 512, 32000, 16, 4, 64
    per_layer = (
        (heads + 2 * groups) * d * hidden
        + heads * d * hidden
        + experts * 3 * ffn * hidden
        + experts * hidden
        + 2 * hidden
        + 2 * d
    ) * 2
    layers = max(LAYOUT.pp, round((size_gb * 1e9 - 2 * vocab * hidden * 2) / per_layer / LAYOUT.pp) * LAYOUT.pp)
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": d,
        "num_experts": experts,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": ffn,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def _shape_args(hf: dict) -> tuple:
    return hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["vocab_size"]


def _owners(params: dict, include_replicas: bool) -> dict[str, list[tuple]]:
    """Every rank's parameters: global name -> [(tp rank, rank, shape, dtype, tp dim)]."""
    import torch.distributed as dist

    mine = [
        (name, p["tp"], dist.get_rank(), tuple(p["data"].shape), p["data"].dtype, p["dim"])
        for name, p in params.items()
        if include_replicas or not p["replica"]
    ]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, list[tuple]] = {}
    for entries in everyone:
        for name, *rest in entries:
            out.setdefault(name, []).append(tuple(rest))
    return {name: sorted(v) for name, v in out.items()}


def gather_export(chunks, out: str, hf: dict) -> None:
    """The baseline export: every shard to rank 0, which converts and writes file by file."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dcp_hf.format import natural_key
    from testkit.megatron_oracle import Oracle, naive_hf, plain_params

    rank = dist.get_rank()
    params = plain_params(chunks)
    owners = _owners(params, include_replicas=False)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    pending, files, weight_map = {}, [], {}
    oracle = Oracle.of(hf)

    def flush():
        name = f"part-{len(files):05d}.safetensors"
        save_file(pending, os.path.join(out, name), metadata={"format": "pt"})
        fd = os.open(os.path.join(out, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        files.append((name, list(pending)))
        pending.clear()

    for name in sorted(owners, key=natural_key):
        shards = owners[name]
        if rank == 0:
            parts = []
            for _, src, shape, dtype, _ in shards:
                if src == 0:
                    parts.append(params[name]["data"])
                else:
                    parts.append(torch.empty(shape, dtype=dtype))
                    dist.recv(parts[-1], src)
            pending.update({k: v.contiguous() for k, v in naive_hf(name, parts, shards[0][4], oracle).items()})
            if sum(t.nbytes for t in pending.values()) >= MAX_SHARD:
                flush()
        else:
            for _, src, *_ in shards:
                if src == rank:
                    dist.send(params[name]["data"].contiguous(), 0)
    if rank == 0:
        if pending:
            flush()
        for k, (name, keys) in enumerate(files):  # the standard names, now that the count is known
            final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            os.rename(os.path.join(out, name), os.path.join(out, final))
            weight_map.update(dict.fromkeys(keys, final))
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf, f)
    dist.barrier()


def megatron_shards(name: str, tp: int, dim: int | None, local_shape: tuple, get, hf: dict) -> list[torch.Tensor]:
    """The baseline import's conversion: a Megatron parameter's TP shards, in rank order, built
    from the full HF tensors (``get(hf_name)``)."""
    import re

    from testkit.megatron_oracle import HF_NAMES, LAYER_NAMES, QK_NORM

    heads, groups, d, _ = _shape_args(hf)
    names = {**LAYER_NAMES, **QK_NORM, "mlp.router.weight": "mlp.gate.weight"}  # Qwen3-MoE's
    if name in HF_NAMES:
        full = get(HF_NAMES[name])
        if "embed" in name or "output" in name:  # padded vocab rows: zeros
            rows = local_shape[0] * tp
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    else:
        m = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
        base, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in names:
            full = get(base + names[rest])
        elif rest.startswith("self_attention.linear_qkv."):
            kind, per = rest.rsplit(".", 1)[1], heads // groups
            q, k, v = (get(f"{base}self_attn.{p}_proj.{kind}") for p in "qkv")
            tail = q.shape[1:]
            full = torch.cat(
                [q.view(groups, per * d, *tail), k.view(groups, d, *tail), v.view(groups, d, *tail)], 1
            ).reshape(-1, *tail)
        elif rest.endswith("linear_fc1.weight"):
            mlp = base + rest[: -len("linear_fc1.weight")]
            gate, up = get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")
            return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        elif rest.endswith("linear_fc2.weight"):
            full = get(base + rest[: -len("linear_fc2.weight")] + "down_proj.weight")
        else:
            raise KeyError(name)
    return list(full.chunk(tp, dim)) if dim is not None else [full] * tp


def scatter_import(chunks, src: str, hf: dict) -> None:
    """The baseline import: rank 0 reads every HF tensor and sends each rank its slice."""
    import torch.distributed as dist
    from safetensors import safe_open

    from dcp_hf.format import natural_key
    from testkit.megatron_oracle import plain_params

    rank = dist.get_rank()
    params = plain_params(chunks)
    owners = _owners(params, include_replicas=True)
    handles = {}
    if rank == 0:
        with open(os.path.join(src, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]

    def get(key):
        file = weight_map[key]
        if file not in handles:
            handles[file] = safe_open(os.path.join(src, file), "pt")
        return handles[file].get_tensor(key)

    for name in sorted(owners, key=natural_key):
        holders = owners[name]
        if rank == 0:
            tp = max(h[0] for h in holders) + 1
            shards = megatron_shards(name, tp, holders[0][4], holders[0][2], get, hf)
            for tp_rank, dst, *_ in holders:
                if dst == 0:
                    params[name]["data"].copy_(shards[tp_rank])
                else:
                    dist.send(shards[tp_rank].contiguous(), dst)
        elif name in params:
            dist.recv(params[name]["data"], 0)
    dist.barrier()


def _digest(chunks) -> str:
    h = hashlib.sha1()
    for chunk in chunks:
        for _, p in chunk.named_parameters():
            h.update(p.detach().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _worker(rank, world, hf: dict, root: str, repeat: int, ops: list[str]):
    import warnings

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from benchmarks.layouts import check_same_tensors
    from benchmarks.measure import measured, measured_save, rotated
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import build_gpt, init_parallel
    from testkit.megatron_oracle import load_torch_dist

    warnings.filterwarnings("ignore")  # megatron-core's advice on training settings
    init_parallel(LAYOUT)
    chunks = build_gpt(hf, LAYOUT, params_dtype=torch.bfloat16)
    want = _digest(chunks)
    export = {
        "ours": lambda out: dmeg.save_hf(chunks, out, config=hf, max_shard_size=MAX_SHARD),
        "gather_to_rank0": lambda out: gather_export(chunks, out, hf),
    }
    load = {
        "ours": lambda src: dmeg.load_hf(chunks, src),
        "gather_to_rank0": lambda src: scatter_import(chunks, src, hf),
    }
    to_torch_dist = _to_torch_dist(chunks)
    samples = {f"{mode} {op}": [] for mode in ("export", "import") for op in ops}
    for r in range(repeat):
        for op in rotated(ops, r):
            out = os.path.join(root, op)
            samples[f"export {op}"].append(measured_save(lambda: export[op](out), out, root, rank))
        if r == 0 and rank == 0:
            check_same_tensors(*(os.path.join(root, op) for op in ops))
        for op in rotated(ops, r):
            with torch.no_grad():
                for chunk in chunks:
                    for p in chunk.parameters():
                        p.zero_()
            dist.barrier()
            samples[f"import {op}"].append(measured(lambda: load[op](os.path.join(root, "ours"))))
            if _digest(chunks) != want:
                raise AssertionError(f"rank {rank}: the {op} import did not restore the parameters")
        for op in rotated(TORCH_DIST_OPS, r):
            out = os.path.join(root, f"mcore-{op}")
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
            if op == "ours":  # import_hf runs outside a Megatron job: the parallel state set aside, untimed
                ps.destroy_model_parallel()
            dist.barrier()
            samples.setdefault(f"torch_dist {op}", []).append(
                measured(lambda: to_torch_dist[op](os.path.join(root, "ours"), out))
            )
            if op == "ours":
                init_parallel(LAYOUT)
            dist.barrier()
            with torch.no_grad():  # the checkpoint holds the model: megatron-core's loader says so
                for chunk in chunks:
                    for p in chunk.parameters():
                        p.zero_()
            load_torch_dist(chunks, os.path.join(out, "iter_0000001") if op == "ours" else out)
            if _digest(chunks) != want:
                raise AssertionError(f"rank {rank}: the {op} torch_dist checkpoint does not hold the model")
    return samples


TORCH_DIST_OPS = ["ours", "load_hf_then_save"]


def _to_torch_dist(chunks):
    """HF -> Megatron torch_dist. Ours: the offline ``import_hf`` (no model; the caller sets
    Megatron's parallel state aside meanwhile). Baseline, Megatron-style: the HF checkpoint loaded into the
    model already built at LAYOUT (by ``load_hf``, the fastest loader at hand), then
    ``dist_checkpointing.save``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import cuda_calls_on_cpu
    from dcp_hf.megatron.import_hf import import_hf

    def ours(src, out):
        import_hf(src, out)

    def baseline(src, out):
        dmeg.load_hf(chunks, src)
        if dist.get_rank() == 0:
            os.makedirs(out)
        dist.barrier()
        with cuda_calls_on_cpu():
            dist_checkpointing.save({"model": chunks[0].sharded_state_dict(metadata={})}, out)

    return {"ours": ours, "load_hf_then_save": baseline}


def run(root: str, repeat: int, size_gb: float = 1.5) -> list[dict]:
    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks

    hf = hf_config(size_gb)
    ops = ["ours", "gather_to_rank0"]
    os.makedirs(root, exist_ok=True)
    print(
        f"  running: Megatron export/import, {hf['num_hidden_layers']} layers x "
        f"{hf['num_experts']} experts at {LAYOUT} ...",
        flush=True,
    )
    per_rank = run_ranks(_worker, 4, hf, root, repeat, ops, timeout=3600, daemon=False)
    nbytes = sum(
        os.path.getsize(os.path.join(root, "ours", f))
        for f in os.listdir(os.path.join(root, "ours"))
        if f.endswith(".safetensors")
    )
    results = []
    for mode in ("export", "import"):
        merged = {op: [merge_ranks([r[f"{mode} {op}"][i] for r in per_rank]) for i in range(repeat)] for op in ops}
        results.append(
            {
                "case": f"Megatron {mode}, Qwen3-MoE shapes, 4 ranks {LAYOUT}",
                "mode": mode,
                "world": 4,
                "layout": str(LAYOUT),
                "state_bytes": nbytes,
                "ops": {op: summarize(s, nbytes) for op, s in merged.items()},
            }
        )
    merged = {
        op: [merge_ranks([r[f"torch_dist {op}"][i] for r in per_rank]) for i in range(repeat)] for op in TORCH_DIST_OPS
    }
    results.append(
        {
            "case": f"HF -> Megatron torch_dist, Qwen3-MoE shapes, 4 ranks (baseline's model at {LAYOUT})",
            "mode": "import torch_dist",
            "world": 4,
            "layout": str(LAYOUT),
            "state_bytes": nbytes,
            "ops": {op: summarize(s, nbytes) for op, s in merged.items()},
        }
    )
    shutil.rmtree(root, ignore_errors=True)
    return results
