"""Megatron-core models <-> HF checkpoints, straight through DCP: every rank writes its own
slice of the final HF files and reads only its own slice; nothing is gathered.

    from dcp_hf import megatron as dmeg
    dmeg.save_hf(model, "/ckpt/hf-export")        # GPTModel or list of VPP chunks, any layout
    dmeg.load_hf(model, "/models/Qwen3-30B-A3B")  # HF checkpoint -> this model's shards

Families: ``FAMILIES``. The family comes from the HF config (``config=``, or the checkpoint's
config.json on load), else ``family=``, else the TransformerConfig when exactly one family
expresses it. An export is checked against transformers' model class of its config.json
before a byte is written.

Call them on every rank of the job (all ranks of the default group, or ``process_group``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os

import torch
import torch.distributed.checkpoint as dcp

from dcp_hf import training_state
from dcp_hf.errors import on_every_rank
from dcp_hf.extras import require
from dcp_hf.layouts import Layout
from dcp_hf.layouts.megatron import MegatronGPT, megatron_layout
from dcp_hf.layouts.quantized import quantization_for_config
from dcp_hf.megatron import optimizer as megatron_optimizer
from dcp_hf.megatron.adapter import ShardedModel, model_chunks
from dcp_hf.megatron.check import check_against_transformers
from dcp_hf.megatron.hf_config import FAMILIES, Family, check_given, hf_config, resolve_family
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.storage import HFStorageReader, HFStorageWriter
from dcp_hf.storage.hf_files import config_dict, parse_config

__all__ = ["FAMILIES", "hf_config", "layout_of", "load_hf", "save_hf"]

require("megatron.core", "megatron", "dcp_hf.megatron", load=False)

KEEP_FP32 = ("*.e_score_correction_bias",)  # DeepSeek's expert bias stays fp32 on export
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
MODEL = "model."  # with an optimizer: the model's keys in the state dict (HFSavePlanner's model_prefix)


def layout_of(
    config, family: Family, vocab_size: int | None = None, output: str = "lm_head.weight", mtp_copies: int = 0
) -> Layout:
    """The layout of a Megatron GPT model of ``family`` (``config``: its TransformerConfig):
    Megatron sharded keys -> HF tensors. ``mtp_copies``: write the embedding and output layer
    also into that many MTP layers (on export)."""
    rule = MegatronGPT(
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        vocab_size=vocab_size,
        attention=family.attention,
        moe_block=family.moe_block,
        expert_names=family.expert_names,
        shared_experts=family.shared_experts,
        num_layers=config.num_layers,
        mtp_copies=mtp_copies,
        output=output,
    )
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


def hf_tensors(layout: Layout, shapes: dict, policy=None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a layout writes: HF name -> (shape, dtype) for in-memory key -> (global shape, dtype)."""
    out = {}
    for key, (shape, dtype) in shapes.items():
        for piece in layout.pieces(key, tuple(shape)):
            out[piece.hf_key] = (tuple(piece.hf_shape), policy(piece.hf_key, dtype) if policy else dtype)
    return out


def all_written(local: dict, process_group=None) -> dict:
    """The union over the ranks of what each writes (a rank knows only its own stages)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(parts, local, group=process_group)
    return {k: v for part in parts for k, v in part.items()}


def _given_config(hf_config_from) -> dict | None:
    if hf_config_from is None or isinstance(hf_config_from, dict):
        return hf_config_from
    return config_dict(hf_config_from)


def _checkpoint_config(path, storage_options: dict | None) -> dict | None:
    """The config.json of an HF checkpoint folder or URL, None where it has none."""
    path = os.fspath(path)
    if "://" not in path:
        file = os.path.join(path, "config.json")
        return _given_config(file) if os.path.isfile(file) else None
    import fsspec

    try:
        with fsspec.open(path.rstrip("/") + "/config.json", "rb", **(storage_options or {})) as f:
            return parse_config(f.read(), path.rstrip("/") + "/config.json")
    except FileNotFoundError:
        return None


def save_hf(
    model,
    path,
    *,
    config: dict | str | os.PathLike | None = None,
    family: str | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    storage_options: dict | None = None,
    process_group=None,
    progress: bool = False,
    write_config: bool = True,
    optimizer=None,
) -> None:
    """Save a Megatron GPT model (any TP/PP/VPP/EP/ETP/DP layout) as an HF checkpoint.

    Before anything is written, on every rank: the family is settled, the config.json checked
    to describe the model, and the tensors the mapping will write compared with those
    transformers' model class of that config.json holds (names, shapes, dtypes); any
    difference is an error naming the keys.

    Args:
        model: the model chunk of this rank, or its list of virtual-pipeline chunks.
        path: output folder or ``s3://`` URL.
        config: an HF config (dict, folder or config.json) to write as config.json; its
            ``model_type`` names the family, and it must agree with the model (layers, shapes,
            experts, routing, RoPE). Without one, config.json is generated from the model's
            TransformerConfig: every setting the family's HF config can express is carried, and
            a setting it cannot express is an error.
        family: one of ``FAMILIES`` (llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe,
            mixtral, glm4_moe, deepseek_v2, deepseek_v3). Default: ``config``'s, else the one
            family whose HF config expresses the TransformerConfig (an error naming the
            candidates when several or none do; Mistral is only taken by name).
        vocab_size: the true vocab size; rows of the (padded) embedding and output layer beyond
            it are not saved. Default: ``config``'s, else the model's.
        dtype: export dtype for floating tensors (e.g. torch.bfloat16); DeepSeek's expert bias
            stays fp32. The optimizer's state keeps its own dtype.
        optimizer: the model's megatron-core optimizer (distributed or not): its state is saved
            beside the weights as training state (:mod:`dcp_hf.megatron.optimizer`), moments
            under the parameters' HF names, committed with the weights; ``load_hf(...,
            optimizer=)`` resumes it in any layout.
    """
    chunks = model_chunks(model)
    given = _given_config(config)
    policy = export_dtype(dtype)

    def prepare():
        fam = resolve_family(chunks[0], given, family)
        if given is not None:
            check_given(given, chunks[0], fam)
        vocab = vocab_size or (given or {}).get("vocab_size") or chunks[0].vocab_size
        hf = given if given is not None else hf_config(chunks[0], fam.name, vocab, dtype)
        c = chunks[0].config
        layout = layout_of(c, fam, vocab, mtp_copies=getattr(c, "mtp_num_layers", None) or 0)
        state = ShardedModel.of(chunks).state_dict(main_replicas_only=True)
        written = hf_tensors(layout, {k: (b.global_shape, b.dtype) for k, b in state.items()}, policy)
        return hf, layout, state, written

    hf, layout, state, written = on_every_rank(prepare, process_group)
    written = all_written(written, process_group)
    on_every_rank(lambda: check_against_transformers(hf, written, f"save_hf to {path}"), process_group)
    if optimizer is not None:  # a training checkpoint
        opt = megatron_optimizer.state_dict(optimizer, chunks, main_replicas_only=True)
        state = {**{MODEL + k: v for k, v in state.items()}, **opt}
    side = {"config.json": (json.dumps(hf, indent=2, sort_keys=True) + "\n").encode()} if write_config else {}
    writer = HFStorageWriter(
        path,
        max_shard_size=max_shard_size,
        dtype=policy,
        overwrite=overwrite,
        storage_options=storage_options,
        process_group=process_group,
        progress=progress,
        side_files=side,
    )
    planner = HFSavePlanner(layout, model_prefix=MODEL if optimizer is not None else None)
    dcp.save(state, storage_writer=writer, planner=planner, process_group=process_group)


def load_hf(
    model,
    path,
    *,
    family: str | None = None,
    allow_dtype_cast: bool = True,
    allow_unexpected=(),
    storage_options: dict | None = None,
    process_group=None,
    optimizer=None,
) -> None:
    """Load an HF checkpoint into a Megatron GPT model's shards, each rank reading only its own.

    The family comes from the checkpoint's config.json (``family`` must agree), which must
    describe the model (layers, shapes, experts, routing, RoPE); without a config.json, from
    ``family`` or the TransformerConfig as in ``save_hf``. Every parameter of the model is
    mapped and every HF tensor it needs must be there. The checkpoint's multi-token-prediction
    layers are skipped when the model has none; their copies of the embedding and output layer
    are not read (the model's own are).

    Padded vocab rows (beyond the checkpoint's vocab) are zeroed. A tied checkpoint (no
    ``lm_head``) fills an untied model's output layer from the embedding; an untied one loads
    into a tied model from ``model.embed_tokens`` (its ``lm_head`` is then not needed).
    ``allow_dtype_cast``: bf16 files into fp32 parameters and the like (default on). A quantized
    release (``quantization_config`` in its config.json: FP8 block-scaled, MXFP4) loads
    dequantized, each rank reading only its blocks and their scales.

    ``optimizer``: also load the optimizer state that ``save_hf(..., optimizer=)`` saved (in
    any other TP/PP/DP layout of the same model), through the optimizer's ``load_state_dict``.
    """
    chunks = model_chunks(model)
    reader = HFStorageReader(
        path, allow_dtype_cast=allow_dtype_cast, storage_options=storage_options, process_group=process_group
    )
    c = chunks[0].config
    unexpected = list(allow_unexpected)

    def prepare():
        given = _checkpoint_config(path, storage_options)
        fam = resolve_family(chunks[0], given, family)
        ours = getattr(c, "mtp_num_layers", None) or 0
        theirs = (given or {}).get("num_nextn_predict_layers") or 0
        if given is not None:
            try:
                check_given(given, chunks[0], fam, loading=True)
            except ValueError as e:
                raise ValueError(f"{path}: config.json: {e}") from None
        else:  # no config.json to compare: the family must express the model all the same
            hf_config(chunks[0], fam.name)
        unexpected.extend(f"model.layers.{c.num_layers + n}.*" for n in range(ours, theirs))
        unexpected.extend(
            f"model.layers.{c.num_layers + n}.{name}"
            for n in range(ours)
            for name in ("embed_tokens.weight", "shared_head.head.weight")
        )
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
                    box.local[max(0, vocab_size - box.offsets[0]) :].zero_()
        layout = layout_of(c, fam, vocab_size, output)
        quantization = quantization_for_config(given) if given else None
        if quantization is not None:  # a quantized release (FP8, MXFP4) loads dequantized
            layout = dataclasses.replace(layout, quantization=quantization)
        return layout, sharded, state

    layout, sharded, state = on_every_rank(prepare, process_group)
    if optimizer is not None:  # first the weights and the param groups (which make the optimizer's state tensors)
        groups = megatron_optimizer.param_groups(optimizer)
        state = {**{MODEL + k: v for k, v in state.items()}, megatron_optimizer.GROUPS: groups}
        unexpected.append(training_state.PREFIX + megatron_optimizer.STATE + "*")
    if getattr(chunks[0], "share_embeddings_and_output_weights", False):
        unexpected.append("lm_head.weight")
    dcp.load(
        state,
        storage_reader=reader,
        planner=HFLoadPlanner(
            layout, allow_unexpected=unexpected, model_prefix=MODEL if optimizer is not None else None
        ),
        process_group=process_group,
    )
    sharded.merge_loaded()
    if optimizer is not None:  # then the optimizer's state, straight into its tensors
        megatron_optimizer.load_param_groups(optimizer, state[megatron_optimizer.GROUPS])
        opt = megatron_optimizer.state_dict(optimizer, chunks, main_replicas_only=False)
        del opt[megatron_optimizer.GROUPS]
        dcp.load(
            opt,
            storage_reader=reader,
            planner=HFLoadPlanner(layout, allow_unexpected=True, model_prefix=MODEL),
            process_group=process_group,
        )
