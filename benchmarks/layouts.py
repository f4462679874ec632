"""Merged-experts benchmark: ``dcp-hf experts merge/split`` (streaming) against the
MindSpeed-MM-style offline conversion of the same checkpoint (whole state in memory)."""

from __future__ import annotations

import json
import os
import shutil

import torch


def make_checkpoint(path: str, layers: int, experts: int, hidden: int, ffn: int) -> int:
    """A Qwen3-MoE-shaped per-expert checkpoint (bf16), written one layer per file."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for layer in range(layers):
        tensors = {}
        for e in range(experts):
            for name, shape in (("gate_proj", (ffn, hidden)), ("up_proj", (ffn, hidden)), ("down_proj", (hidden, ffn))):
                t = torch.randint(-8, 8, shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{name}.weight"] = t
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.zeros(experts, hidden)
        file = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_moe", "num_experts": experts, "num_hidden_layers": layers}, f)
    return total


def mindspeed_style(direction: str, src: str, dst: str, layers: int, experts: int) -> None:
    """The offline algorithm of MindSpeed-MM's ``mm-convert moe_expert`` (flat style): load the
    whole state dict, merge or split layer by layer, save it with huggingface_hub's sharding."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file, save_file

    state = {}
    for file in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
        state.update(load_file(os.path.join(src, file)))
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp.experts"
        if direction == "merge":
            gu = [
                torch.cat([state.pop(f"{p}.{e}.gate_proj.weight"), state.pop(f"{p}.{e}.up_proj.weight")]).T
                for e in range(experts)
            ]
            dn = [state.pop(f"{p}.{e}.down_proj.weight").T for e in range(experts)]
            gate_up, down = torch.stack(gu), torch.stack(dn)
            state[f"{p}.gate_up_proj"] = gate_up.view(-1, gate_up.shape[-1])
            state[f"{p}.down_proj"] = down.view(-1, down.shape[-1])
        else:
            gate_up, down = state.pop(f"{p}.gate_up_proj"), state.pop(f"{p}.down_proj")
            gate_up = gate_up.view(experts, -1, gate_up.shape[-1])  # [E, H, 2F]
            down = down.view(experts, -1, down.shape[-1])  # [E, F, H]
            for e in range(experts):
                gate, up = torch.chunk(gate_up[e].T, 2)
                state[f"{p}.{e}.gate_proj.weight"] = gate
                state[f"{p}.{e}.up_proj.weight"] = up
                state[f"{p}.{e}.down_proj.weight"] = down[e].T
    os.makedirs(dst, exist_ok=True)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size="5GB"
    )
    for file, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, os.path.join(dst, file), metadata={"format": "pt"})


def _worker(rank, world, op: str, direction: str, src: str, dst: str, layers: int, experts: int):
    from benchmarks.measure import measured
    from dcp_hf.convert import experts as dcp_hf_experts

    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    if op == "ours":
        fn = lambda: dcp_hf_experts(direction, src, dst, "flat")  # noqa: E731
    else:
        fn = lambda: mindspeed_style(direction, src, dst, layers, experts)  # noqa: E731
    sample = measured(fn)
    os.sync()
    return sample


def run(root: str, repeat: int, layers: int = 4, experts: int = 64, hidden: int = 1024, ffn: int = 512) -> list[dict]:
    """Each operation runs in a fresh process (its peak RSS is its own)."""
    from benchmarks.measure import summarize
    from dcp_hf.local_ranks import run_ranks

    src = os.path.join(root, "per-expert")
    nbytes = make_checkpoint(src, layers, experts, hidden, ffn)
    # The merged input of ``split`` is our merge's output (checked equal to the baseline's).
    run_ranks(_worker, 1, "ours", "merge", src, os.path.join(root, "merged"), layers, experts, timeout=3600)
    results = []
    for direction, source in (("merge", src), ("split", os.path.join(root, "merged"))):
        print(f"  running: experts {direction}, {layers} layers x {experts} experts ...", flush=True)
        samples = {"ours": [], "mindspeed_style_offline": []}
        for _ in range(repeat):
            for op in samples:
                samples[op] += run_ranks(
                    _worker, 1, op, direction, source, os.path.join(root, f"out-{op}"), layers, experts, timeout=3600
                )
        results.append(
            {
                "case": f"experts {direction}, {layers} layers x {experts} experts "
                f"(one layer {nbytes / layers / 1e6:.0f} MB)",
                "mode": direction,
                "world": 1,
                "state_bytes": nbytes,
                "ops": {op: summarize(s, nbytes) for op, s in samples.items()},
            }
        )
    check_same_tensors(os.path.join(root, "out-ours"), os.path.join(root, "out-mindspeed_style_offline"))
    shutil.rmtree(root, ignore_errors=True)
    return results


def check_same_tensors(a: str, b: str) -> None:
    """Both conversions must produce the same tensors (the benchmark compares equal work)."""
    from safetensors.torch import load_file

    def tensors(path):
        out = {}
        for f in os.listdir(path):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(path, f)))
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys() or any(not torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)) for k in ta):
        raise AssertionError("dcp-hf and the offline baseline produced different tensors")
