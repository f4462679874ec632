"""Rank functions for the Megatron tests (spawned processes import them from here), and the
test oracle: a naive gather of full tensors from every rank's plain parameters."""

from __future__ import annotations

import json
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


def run_layouts(rank, world, hf_dir, out_root, layouts, experts="sequential", pad_vocab_to=None, dtype=None, mtp=False):
    """At each layout i: a random model saved to rand{i} (with its parameters dumped for the
    oracle), the HF checkpoint loaded and saved again to rt{i}, and the previous layout's random
    export loaded and saved again to cross{i}."""
    import torch.distributed as dist

    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import build_gpt, init_parallel

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    for i, p in enumerate(layouts):
        init_parallel(p)
        chunks = build_gpt(hf, p, experts=experts, seed=100 + i, pad_vocab_to=pad_vocab_to, mtp=mtp)
        dmeg.save_hf(
            chunks,
            f"{out_root}/rand{i}",
            family=hf["model_type"],
            vocab_size=hf["vocab_size"],
            dtype=dtype,
            max_shard_size="20KB",
        )
        dump_params(chunks, f"{out_root}/dump{i}", rank)
        dmeg.load_hf(chunks, hf_dir)
        dmeg.save_hf(chunks, f"{out_root}/rt{i}", config=hf_dir)  # config.json given: checked against the model
        if i:
            dmeg.load_hf(chunks, f"{out_root}/rand{i - 1}")
            dmeg.save_hf(chunks, f"{out_root}/cross{i}", vocab_size=hf["vocab_size"], dtype=dtype)
        dist.barrier()
    return True


def run_families(rank, world, jobs):
    """``run_layouts`` for several models in one set of processes: jobs of (HF folder, output
    folder, layouts, with MTP layers)."""
    for hf_dir, out_root, layouts, mtp in jobs:
        run_layouts(rank, world, hf_dir, out_root, layouts, mtp=mtp)
    return True


def dump_params(chunks, folder, rank):
    os.makedirs(folder, exist_ok=True)
    params = {name: {**p, "data": p["data"].clone()} for name, p in plain_params(chunks).items()}
    torch.save(params, f"{folder}/rank{rank}.pt")


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


def save_at(rank, world, hf_dir, out, layout, experts):
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import build_gpt, init_parallel

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    init_parallel(layout)
    dmeg.save_hf(build_gpt(hf, layout, experts=experts), out)


def load_into(rank, world, model_from, hf_dir, layout):
    """Build the model of ``model_from``'s config and load ``hf_dir`` into it."""
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import build_gpt, init_parallel

    with open(os.path.join(model_from, "config.json")) as f:
        hf = json.load(f)
    init_parallel(layout)
    dmeg.load_hf(build_gpt(hf, layout), hf_dir)


# Megatron-LM's training arguments (megatron/training/arguments.py) that build a GPT model, by
# the names it records them under, from the TransformerConfig field each becomes (renamed ones
# in MEGATRON_LM_RENAMED); stated here, independently of dcp_hf.megatron.training_args.
MEGATRON_LM_SAME_NAME = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "num_query_groups",
    "normalization",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "qk_l2_norm",
    "rotary_interleaved",
    "apply_residual_connection_post_layernorm",
    "window_size",
    "window_attn_skip_freq",
    "no_rope_freq",
    "softmax_type",
    "softmax_scale",
    "glu_linear_offset",
    "activation_func_clamp_value",
    "mtp_num_layers",
    "multi_latent_attention",
    "moe_ffn_hidden_size",
    "moe_layer_freq",
    "moe_router_topk",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_enable_expert_bias",
    "moe_router_load_balancing_type",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_router_dtype",
    "moe_aux_loss_coeff",
    "moe_grouped_gemm",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "rope_type",
    "rotary_scaling_factor",
    "mscale",
    "mscale_all_dim",
    "params_dtype",
    "hidden_dropout",
    "attention_dropout",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
)
MEGATRON_LM_RENAMED = {"norm_epsilon": "layernorm_epsilon", "apply_layernorm_1p": "layernorm_zero_centered_gamma"}


def megatron_lm_args(model, rope_scaling_factor=8.0):
    """The argparse namespace Megatron-LM records in a checkpoint of ``model`` (a GPTModel),
    with some of the training-only arguments it holds beside them."""
    import argparse

    import torch.nn.functional as F  # noqa: N812
    from megatron.core.transformer.enums import AttnBackend

    c = model.config
    args = {name: getattr(c, name) for name in MEGATRON_LM_SAME_NAME if hasattr(c, name)}
    args.update({theirs: getattr(c, ours) for theirs, ours in MEGATRON_LM_RENAMED.items()})
    heads = c.num_attention_heads
    rotary = getattr(model, "rotary_pos_emb", None)
    args.update(
        num_experts=c.num_moe_experts,
        group_query_attention=bool(c.num_query_groups and c.num_query_groups != heads),
        swiglu=c.gated_linear_unit and c.activation_func is F.silu,
        padded_vocab_size=model.vocab_size,
        max_position_embeddings=model.max_sequence_length,
        seq_length=model.max_sequence_length,
        untie_embeddings_and_output_weights=not model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        use_rope_scaling=model.rotary_scaling,
        rope_scaling_factor=rope_scaling_factor,
        rotary_seq_len_interpolation_factor=getattr(rotary, "seq_len_interpolation_factor", None),
        attention_backend=AttnBackend.auto,
        lr=3e-4,
        micro_batch_size=2,
        global_batch_size=16,
        seed=1234,
        tokenizer_type="HuggingFaceTokenizer",
        save="/checkpoints/run",
        bf16=False,
    )
    return argparse.Namespace(**args)


def save_torch_dist(rank, world, hf_dir, out, layout, experts="sequential", mtp=False):
    """A Megatron ``torch_dist`` checkpoint (megatron.core.dist_checkpointing, its default
    sharded form: layers stacked) of the HF model, saved at ``layout``; the model's parameters
    dumped in ``out``-params for the oracle (a round trip through one mapping would not see a
    mistake the mapping makes both ways)."""
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import build_gpt, init_parallel

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    init_parallel(layout)
    chunks = build_gpt(hf, layout, experts=experts, pad_vocab_to=72, mtp=mtp)
    dmeg.load_hf(chunks, hf_dir)
    dump_params(chunks, f"{out}-params", rank)
    write_torch_dist(chunks, out, megatron_lm_args(chunks[0]))


def write_torch_dist(chunks, out, args=None):
    """``dist_checkpointing.save`` of the model as Megatron-LM saves it: the model's sharded
    state dict beside its training ``args`` (which land in common.pt), checkpoint version and
    iteration; without ``args`` when None."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from dcp_hf.megatron.build import cuda_calls_on_cpu

    # metadata a dict: megatron-core fills its dp_cp_group (MTP needs it)
    state = {"model": chunks[0].sharded_state_dict(metadata={}), "checkpoint_version": 3.0, "iteration": 10}
    if args is not None:
        state["args"] = args
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    with cuda_calls_on_cpu():  # its checkpoint writer synchronizes CUDA
        dist_checkpointing.save(state, out)


def torch_dist_cases(rank, world, out_root, cases):
    """Each case (name, HF folder of the base model, TransformerConfig overrides, GPTModel
    overrides, settings written into the built model's config, with args): a random
    one-process model written as a torch_dist checkpoint in out_root/name, with the Megatron-LM
    arguments of that model (or none); Megatron's logits beside it (``name.megatron.pt``)."""
    ids = torch.arange(24).view(2, 12) % 64
    for name, hf_dir, overrides, gpt_overrides, after, with_args in cases:
        chunks = case_model(hf_dir, overrides, gpt_overrides, after)
        factor = (gpt_overrides or {}).get("rope_scaling_factor", 8.0)
        write_torch_dist(
            chunks, os.path.join(out_root, name), megatron_lm_args(chunks[0], factor) if with_args else None
        )
        if not after:
            torch.save(megatron_logits(chunks, ids), os.path.join(out_root, f"{name}.megatron.pt"))


def save_torch_dists(rank, world, jobs):
    """``save_torch_dist`` of several models: jobs of (HF folder, output, layout, with MTP)."""
    for hf_dir, out, layout, mtp in jobs:
        save_torch_dist(rank, world, hf_dir, out, layout, mtp=mtp)


def export_offline(rank, world, src, dst, config):
    from dcp_hf.megatron.export import export_torch_dist

    return export_torch_dist(src, dst, config)


def try_saves(rank, world, out_root, cases):
    """Each case (name, HF config to build the model from, save_hf keyword arguments): build
    it at TP``world`` and save it; the error (or None) and whether anything was written."""
    import torch.distributed as dist

    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import Parallel, build_gpt, init_parallel

    init_parallel(Parallel(tp=world))
    results = {}
    for name, hf, kwargs in cases:
        chunks = build_gpt(hf, Parallel(tp=world))
        path = os.path.join(out_root, name)
        try:
            dmeg.save_hf(chunks, path, **kwargs)
            error = None
        except Exception as e:  # noqa: BLE001 - the test reads the message
            error = f"{type(e).__name__}: {e}"
        dist.barrier()
        results[name] = (error, os.path.exists(path))
    return results


def megatron_logits(chunks, ids: torch.Tensor) -> torch.Tensor:
    """Megatron's own forward of a one-process model on CPU (eval mode, causal mask given:
    megatron-core's default mask is made on CUDA; dropout's RNG fork is a no-op in eval; the
    MoE router's test for Transformer Engine's GEMM fails on a name its import guard leaves
    undefined, so that name is defined as None, the value it has when TE is absent)."""
    import contextlib

    from megatron.core.tensor_parallel import random

    from dcp_hf.megatron.build import cuda_calls_on_cpu

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16's router names it only when TE imports
        moe_utils.te_general_gemm = None
    (model,) = chunks
    model.eval()
    tracker = random.get_cuda_rng_tracker()
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        with torch.no_grad(), cuda_calls_on_cpu():
            out = model(input_ids=ids, position_ids=torch.arange(seq).expand_as(ids), attention_mask=mask)
    finally:
        del tracker.fork
    return out.float()


def case_model(hf_dir, overrides, gpt_overrides, after) -> list:
    """A random one-process model of ``hf_dir``'s config with TransformerConfig ``overrides``
    and GPTModel ``gpt_overrides``; ``after``: settings written into its config once built
    (what megatron-core's local layer spec cannot build on CPU, and only the config reads)."""
    from dcp_hf.megatron.build import Parallel, build_gpt, init_parallel

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    init_parallel(Parallel())
    chunks = build_gpt(hf, Parallel(), seed=3, overrides=overrides, gpt_overrides=gpt_overrides)
    for key, value in after.items():
        setattr(chunks[0].config, key, value)
    return chunks


def trust_cases(rank, world, out_root, cases):
    """Each case (name, HF folder of the base model, TransformerConfig overrides, GPTModel
    overrides, settings written into the built model's config): a random one-process model with
    those settings; save_hf without a config (generated), save_hf with the base folder's config,
    load_hf of the base folder, and load_hf of its weights without config.json (``-bare``) with
    its family named. Returns name -> (save error, written, config= save error, load error,
    config= save written, bare load error); where the save was written, Megatron's logits beside it (``megatron.pt``)."""
    from dcp_hf import megatron as dmeg

    def attempt(fn):
        try:
            fn()
            return None
        except BaseException as e:  # noqa: BLE001 - the test reads the message (DCP's CheckpointException too)
            return f"{type(e).__name__}: {e}"

    results = {}
    ids = torch.arange(24).view(2, 12) % 64
    for name, hf_dir, overrides, gpt_overrides, after in cases:
        try:
            chunks = case_model(hf_dir, overrides, gpt_overrides, after)
        except Exception as e:  # noqa: BLE001 - a case megatron-core cannot build here: the test says which
            results[name] = f"build: {type(e).__name__}: {e}"
            continue
        path = os.path.join(out_root, name)
        error = attempt(lambda: dmeg.save_hf(chunks, path))
        if error is None:
            torch.save(megatron_logits(chunks, ids), os.path.join(out_root, f"{name}.megatron.pt"))
        given = attempt(lambda: dmeg.save_hf(chunks, path + "-given", config=hf_dir))
        loaded = attempt(lambda: dmeg.load_hf(chunks, hf_dir))
        family = os.path.basename(hf_dir)  # the base folders are named by family
        bare = attempt(lambda: dmeg.load_hf(chunks, hf_dir + "-bare", family=family))
        results[name] = (error, os.path.exists(path), given, loaded, os.path.exists(path + "-given"), bare)
    return results


def refused_families(rank, world, hf_dir, out_root, configs):
    """A model of ``hf_dir``'s config; for each (name, HF config of a family dcp-hf does not
    map): save_hf with that config, and load_hf of ``hf_dir``'s weights beside that config.json.
    Returns name -> (save error, written, load error)."""
    import shutil

    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import Parallel, build_gpt, init_parallel

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    init_parallel(Parallel())
    chunks = build_gpt(hf, Parallel())
    results = {}
    for name, config in configs.items():
        path, source = os.path.join(out_root, name), os.path.join(out_root, f"{name}-src")
        shutil.copytree(hf_dir, source)
        with open(os.path.join(source, "config.json"), "w") as f:
            json.dump(config, f)
        errors = []
        for fn in (lambda: dmeg.save_hf(chunks, path, config=config), lambda: dmeg.load_hf(chunks, source)):
            try:
                fn()
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - the test reads the message
                errors.append(f"{type(e).__name__}: {e}")
        results[name] = (errors[0], os.path.exists(path), errors[1])
    return results
