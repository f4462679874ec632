"""The Megatron tests' oracle, shared with the benchmarks: a naive gather of full tensors from
every rank's plain parameters, named by its own statement of the mapping, and megatron-core's
own loader of a ``torch_dist`` checkpoint."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

# The oracle's own statement of the mapping, written from the HF modeling code of each family
# (modeling_<family>.py of transformers: module names, q/k/v and gate/up order) and
# megatron-core's modules; it shares nothing with dcp_hf's tables.
HF_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
}
QK_NORM = {  # GQA: per-head RMSNorm of q and k (Qwen3, GLM-4.5 use_qk_norm)
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
MLA_NAMES = {  # DeepSeek-V2/V3 attention (modeling_deepseek_v3.DeepseekV3Attention)
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
}
MTP_OWN = {  # DeepSeek-V3/GLM-4.5 MTP layer: enorm(embedding), hnorm(hidden) -> eh_proj; shared_head
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
}


@dataclass(frozen=True)
class Oracle:
    """What the oracle needs to know of the model: family, attention shape, true vocab, decoder
    layers (MTP layer N is HF layer ``layers + N``), tied embeddings, MTP layers."""

    family: str
    heads: int
    groups: int
    head_dim: int
    vocab_size: int
    layers: int
    tied: bool = False
    mtp: int = 0

    @classmethod
    def of(cls, hf: dict, mtp: int = 0) -> "Oracle":
        heads = hf["num_attention_heads"]
        return cls(
            hf["model_type"],
            heads,
            hf.get("num_key_value_heads") or heads,
            hf.get("head_dim") or hf["hidden_size"] // heads,
            hf["vocab_size"],
            hf["num_hidden_layers"],
            bool(hf.get("tie_word_embeddings")),
            mtp,
        )

    def moe_names(self):
        """(module of the router and routed experts, expert gate, up, down linears)."""
        if self.family == "mixtral":  # MixtralSparseMoeBlock: w1 gate, w3 up, w2 down
            return "block_sparse_moe", "w1", "w3", "w2"
        return "mlp", "gate_proj", "up_proj", "down_proj"

    def shared_module(self):
        return "mlp.shared_expert" if self.family == "qwen2_moe" else "mlp.shared_experts"


def plain_params(chunks) -> dict[str, dict]:
    """This rank's plain parameters under global names (layer and expert numbers made global),
    with what the naive gather needs to know: TP dim and rank, replica or not."""
    from megatron.core import parallel_state as ps

    ep, etp = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    tp, dp = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    edp = ps.get_expert_data_parallel_rank()
    out = {}
    for chunk in chunks:
        numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        buffers = [(n, b) for n, b in chunk.named_buffers() if n.endswith("router.expert_bias")]
        for name, param in [*chunk.named_parameters(), *buffers]:
            m = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
            if m:
                name = f"decoder.layers.{numbers[int(m.group(1))]}.{m.group(2)}"
            e = re.match(r"(.+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)", name)
            is_expert = e is not None
            if e:
                n_local = _local_experts(chunk)
                name = f"{e.group(1)}{ep * n_local + int(e.group(2))}.{e.group(3)}"
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            out[name] = dict(
                data=param.detach(), dim=dim, tp=etp if is_expert else tp, replica=(edp if is_expert else dp) != 0
            )
    return out


def _local_experts(chunk) -> int:
    for layer in chunk.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            return len(experts.local_experts)
    return 0


def naive_gather(folder) -> dict[str, tuple[list[torch.Tensor], int | None]]:
    """Every parameter's shards in TP order (main replicas only), from every rank's dump."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    dims = {}
    for file in sorted(os.listdir(folder)):
        for name, p in torch.load(os.path.join(folder, file)).items():
            if p["replica"]:
                continue
            tp = p["tp"] if p["dim"] is not None else 0
            shards.setdefault(name, {})[tp] = p["data"]
            dims[name] = p["dim"]
    return {n: ([s[k] for k in sorted(s)], dims[n]) for n, s in shards.items()}


def oracle_hf(folder, oracle: Oracle) -> dict[str, torch.Tensor]:
    """The HF state dict of the dumped model, converted the textbook way from full tensors."""
    out = {}
    for name, (parts, dim) in naive_gather(folder).items():
        out.update(naive_hf(name, parts, dim, oracle))
    for n in range(oracle.mtp):  # HF MTP layers hold their own copies of the shared embedding/head
        out[f"model.layers.{oracle.layers + n}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[f"model.layers.{oracle.layers + n}.shared_head.head.weight"] = out["lm_head.weight"]
    return out


def naive_hf(name, parts, dim, o: Oracle) -> dict[str, torch.Tensor]:
    """The HF tensors of one Megatron parameter, from its TP shards in rank order (``dim``: the
    TP dim, None when replicated)."""
    full = torch.cat(parts, dim) if dim is not None else parts[0]
    if name in HF_NAMES:
        if name == "output_layer.weight" and o.tied:
            return {}
        return {HF_NAMES[name]: full[: o.vocab_size] if "embed" in name or "output" in name else full}
    m = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
    if m is None:
        m = re.match(r"mtp\.layers\.(\d+)\.(.+)", name)
        base, rest = f"model.layers.{o.layers + int(m.group(1))}.", m.group(2)
        if rest in MTP_OWN:
            return {base + MTP_OWN[rest]: full}
        rest = rest.removeprefix("transformer_layer.")
    else:
        base, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in LAYER_NAMES:
        return {base + LAYER_NAMES[rest]: full}
    if o.family.startswith("deepseek") and rest in MLA_NAMES:
        return {base + MLA_NAMES[rest]: full}
    if rest in QK_NORM:
        return {base + QK_NORM[rest]: full}
    if rest.startswith("self_attention.linear_qkv."):  # weight or bias: per group [q heads | k | v]
        per, kind = o.heads // o.groups, rest.rsplit(".", 1)[1]
        qkv = full.view(o.groups, per + 2, o.head_dim, *full.shape[1:])
        return {
            f"{base}self_attn.q_proj.{kind}": qkv[:, :per].reshape(-1, *full.shape[1:]),
            f"{base}self_attn.k_proj.{kind}": qkv[:, per].reshape(-1, *full.shape[1:]),
            f"{base}self_attn.v_proj.{kind}": qkv[:, per + 1].reshape(-1, *full.shape[1:]),
        }
    return _mlp_hf(name, base, rest, parts, full, o)


def _mlp_hf(name, base, rest, parts, full, o: Oracle) -> dict[str, torch.Tensor]:
    """``naive_hf`` of the MLP, router and expert parameters of layer ``base``."""
    block, gate, up, down = o.moe_names()
    if rest == "mlp.router.weight":
        return {f"{base}{block}.gate.weight": full}
    if rest == "mlp.router.expert_bias":
        return {f"{base}{block}.gate.e_score_correction_bias": full}
    if rest == "mlp.shared_experts.gate_weight":  # Qwen2MoeSparseMoeBlock.shared_expert_gate
        return {f"{base}mlp.shared_expert_gate.weight": full}
    e = re.fullmatch(r"mlp\.experts\.(\d+)\.(linear_fc\d)\.weight", rest)
    if e:
        module, names = f"{base}{block}.experts.{e.group(1)}.", (gate, up, down)
    elif rest.startswith("mlp.shared_experts."):
        module, names = f"{base}{o.shared_module()}.", ("gate_proj", "up_proj", "down_proj")
    elif rest.startswith("mlp.linear_fc"):
        module, names = f"{base}mlp.", ("gate_proj", "up_proj", "down_proj")
    else:
        raise KeyError(f"the oracle has no name for {name}")
    if rest.endswith("linear_fc1.weight"):  # each TP rank holds [gate_r; up_r]
        return {
            f"{module}{names[0]}.weight": torch.cat([p.chunk(2)[0] for p in parts]),
            f"{module}{names[1]}.weight": torch.cat([p.chunk(2)[1] for p in parts]),
        }
    return {f"{module}{names[2]}.weight": full}


def load_torch_dist(chunks, folder) -> None:
    """``dist_checkpointing.load`` into a model's chunks, as Megatron-LM's ``--load`` does
    (``model0``, ``model1``... for the virtual-pipeline chunks), then ``load_state_dict``."""
    from megatron.core import dist_checkpointing

    from dcp_hf.megatron.build import cuda_calls_on_cpu

    state = {f"model{i}": chunk.sharded_state_dict(metadata={}) for i, chunk in enumerate(chunks)}
    with cuda_calls_on_cpu():
        loaded = dist_checkpointing.load(state, folder)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=True)
