"""Megatron-core models <-> HF checkpoints, straight through DCP: every rank writes its own
slice of the final HF files and reads only its own slice; nothing is gathered.

    from dcp_hf import megatron as dmeg
    dmeg.save_hf(model, "/ckpt/hf-export")        # GPTModel or list of VPP chunks, any layout
    dmeg.load_hf(model, "/models/Qwen3-30B-A3B")  # HF checkpoint -> this model's shards

Call them on every rank of the job (all ranks of the default group, or ``process_group``).
"""

from __future__ import annotations

import fnmatch
import json
import os

import torch
import torch.distributed.checkpoint as dcp

from dcp_hf.errors import on_every_rank
from dcp_hf.extras import require
from dcp_hf.layouts import Layout
from dcp_hf.layouts.megatron import MegatronGPT, megatron_layout
from dcp_hf.megatron.adapter import ShardedModel, model_chunks
from dcp_hf.megatron.hf_config import FAMILIES, family_of, hf_config
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.storage import HFStorageReader, HFStorageWriter

__all__ = ["FAMILIES", "hf_config", "layout_of", "load_hf", "save_hf"]

require("megatron.core", "megatron", "dcp_hf.megatron", load=False)

KEEP_FP32 = ("*.e_score_correction_bias",)  # DeepSeek's expert bias stays fp32 on export
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def layout_of(model, vocab_size: int | None = None, family: str | None = None,
              output: str = "lm_head.weight") -> Layout:
    """The layout of a Megatron GPT model (a chunk or list of chunks, or anything with its
    ``config``): Megatron sharded keys -> HF tensors of ``family``."""
    config = model_chunks(model)[0].config if not hasattr(model, "num_attention_heads") else model
    family = family or family_of(config)
    rule = MegatronGPT(
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels, vocab_size=vocab_size,
        attention="mla" if getattr(config, "multi_latent_attention", False) else "gqa",
        shared_experts="shared_expert" if family == "qwen2_moe" else "shared_experts", output=output)
    return megatron_layout(rule)


def export_dtype(dtype: torch.dtype | None, keep=KEEP_FP32):
    """A writer dtype policy: floating tensors to ``dtype``, except the ``keep`` patterns."""
    if dtype is None:
        return None

    def policy(key: str, current: torch.dtype) -> torch.dtype:
        if not current.is_floating_point or any(fnmatch.fnmatchcase(key, p) for p in keep):
            return current
        return dtype
    return policy


def _given_config(hf_config_from) -> dict | None:
    if hf_config_from is None or isinstance(hf_config_from, dict):
        return hf_config_from
    path = os.fspath(hf_config_from)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def save_hf(model, path, *, config: dict | str | os.PathLike | None = None, family: str | None = None,
            vocab_size: int | None = None, dtype: torch.dtype | None = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False,
            storage_options: dict | None = None, process_group=None, progress: bool = False,
            write_config: bool = True) -> None:
    """Save a Megatron GPT model (any TP/PP/VPP/EP/ETP/DP layout) as an HF checkpoint.

    Args:
        model: the model chunk of this rank, or its list of virtual-pipeline chunks.
        path: output folder or ``s3://`` URL.
        config: an HF config (dict, folder or config.json) to write as config.json; without
            one, config.json is generated from the model's TransformerConfig for ``family``.
        family: llama, qwen2, qwen3, qwen3_moe or deepseek_v3 (default: guessed from the
            config: MLA -> deepseek_v3, MoE -> qwen3_moe, qk norm -> qwen3, qkv bias -> qwen2).
        vocab_size: the true vocab size; rows of the (padded) embedding and output layer beyond
            it are not saved. Default: ``config``'s, else the model's.
        dtype: export dtype for floating tensors (e.g. torch.bfloat16); DeepSeek's expert bias
            stays fp32.
    """
    chunks = model_chunks(model)
    given = _given_config(config)
    vocab_size = vocab_size or (given or {}).get("vocab_size") or chunks[0].vocab_size
    hf = given if given is not None else hf_config(chunks[0], family, vocab_size, dtype) if write_config else None
    side = {"config.json": (json.dumps(hf, indent=2, sort_keys=True) + "\n").encode()} if hf else {}
    writer = HFStorageWriter(path, max_shard_size=max_shard_size, dtype=export_dtype(dtype),
                             overwrite=overwrite, storage_options=storage_options,
                             process_group=process_group, progress=progress, side_files=side)
    state = on_every_rank(lambda: ShardedModel.of(chunks).state_dict(main_replicas_only=True),
                          process_group)
    dcp.save(state, storage_writer=writer, planner=HFSavePlanner(layout_of(chunks, vocab_size, family)),
             process_group=process_group)


def load_hf(model, path, *, family: str | None = None, allow_dtype_cast: bool = True,
            allow_unexpected=(), storage_options: dict | None = None, process_group=None) -> None:
    """Load an HF checkpoint into a Megatron GPT model's shards, each rank reading only its own.

    Padded vocab rows (beyond the checkpoint's vocab) are zeroed. A tied checkpoint (no
    ``lm_head``) fills an untied model's output layer from the embedding; an untied one loads
    into a tied model from ``model.embed_tokens`` (its ``lm_head`` is then not needed).
    ``allow_dtype_cast``: bf16 files into fp32 parameters and the like (default on).
    """
    chunks = model_chunks(model)
    reader = HFStorageReader(path, allow_dtype_cast=allow_dtype_cast, storage_options=storage_options)

    def prepare():
        stored = reader.read_metadata().state_dict_metadata
        embed = "model.embed_tokens.weight"
        vocab_size = stored[embed].size[0] if embed in stored else None
        output = "lm_head.weight" if "lm_head.weight" in stored else embed  # tied checkpoint
        sharded = ShardedModel.of(chunks)
        state = sharded.state_dict(main_replicas_only=False)
        if vocab_size is not None:  # padded vocab rows: zeros
            for key in VOCAB_KEYS:
                if key in state:
                    box = state[key]
                    box.local[max(0, vocab_size - box.offsets[0]):].zero_()
        return layout_of(chunks, vocab_size, family, output), sharded, state

    layout, sharded, state = on_every_rank(prepare, process_group)
    unexpected = list(allow_unexpected)
    if getattr(chunks[0], "share_embeddings_and_output_weights", False):
        unexpected.append("lm_head.weight")
    dcp.load(state, storage_reader=reader,
             planner=HFLoadPlanner(layout, allow_unexpected=unexpected), process_group=process_group)
    sharded.merge_loaded()
