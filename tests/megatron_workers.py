"""Rank functions for the Megatron tests (spawned processes import them from here); the oracle
they check against is :mod:`testkit.megatron_oracle`."""

from __future__ import annotations

import json
import os

import torch

from testkit.megatron_oracle import (  # noqa: F401 (tests import the oracle from here too)
    HF_NAMES,
    LAYER_NAMES,
    MLA_NAMES,
    MTP_OWN,
    QK_NORM,
    Oracle,
    naive_gather,
    naive_hf,
    oracle_hf,
    plain_params,
)


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
    from megatron.core.transformer.moe import moe_utils

    from dcp_hf.megatron.build import cuda_calls_on_cpu

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
