"""Layouts of known model families, chosen from a checkpoint's config.json."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from dcp_hf.layouts.core import IDENTITY, Layout, Prefix, Rename
from dcp_hf.layouts.experts import STYLES, MergedExperts
from dcp_hf.layouts.quantized import GPT_OSS_EXPERTS, MXFP4, quantization_for_config

# transformers v5 keeps these families' experts fused in memory ([E, 2F, H] / [E, H, F]).
TRANSFORMERS_MOE = ("qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "olmoe", "mixtral")


def _get(config: dict, *path, default=None):
    for p in path:
        if not isinstance(config, dict) or p not in config:
            return default
        config = config[p]
    return config


def layout_for_config(config: dict, style: str | None = None) -> Layout:
    """``_family_layout`` plus the checkpoint's quantization (``quantization_config``)."""
    layout = _family_layout(config, style)
    quantization = quantization_for_config(config)
    if quantization is None:
        return layout
    rules = layout.rules
    if isinstance(quantization, MXFP4) and config.get("model_type") == "gpt_oss":
        rules = (GPT_OSS_EXPERTS,) + rules  # transformers' experts are the stored ones transposed
    return replace(layout, rules=rules, quantization=quantization,
                   name=f"{layout.name}, {type(quantization).__name__}")


def _family_layout(config: dict, style: str | None = None) -> Layout:
    """The layout of a model given its config.json: which merged-experts style and names
    (``style`` overrides the family's default style), and its prefixes."""
    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown layout style {style!r}; one of {STYLES}")

    if model_type == "internvl_chat" or "InternVLChatModel" in archs:  # InternVLChatConfig
        experts = _get(config, "llm_config", "num_experts")
        return Layout((MergedExperts(style or "flat", experts),), name="internvl")
    if model_type == "qwen3_omni_moe":  # Qwen3OmniMoeConfig: thinker.* on disk, no prefix in memory
        experts = _get(config, "thinker_config", "text_config", "num_experts")
        return Layout((MergedExperts(style or "flat", experts),), (Prefix("", "thinker."),),
                      name="qwen3_omni_moe")
    if model_type == "glm4v_moe":  # Glm4vMoeConfig; dense layers below first_k_dense_replace stay as they are
        experts = _get(config, "text_config", "n_routed_experts")
        return Layout((MergedExperts(style or "flat", experts),), name="glm4v_moe")
    if model_type == "mixtral":
        experts = config.get("num_local_experts")
        return Layout((MergedExperts(style or "transformers", experts, hf_gate="w1.weight",
                                     hf_up="w3.weight", hf_down="w2.weight"),),
                      (Rename(".mlp.", ".block_sparse_moe."),), name="mixtral")
    if model_type in TRANSFORMERS_MOE:
        experts = (config.get("num_experts") or config.get("num_local_experts")
                   or config.get("n_routed_experts"))
        return Layout((MergedExperts(style or "transformers", experts),), name=model_type)
    if style is not None:  # an unknown family with an explicit style: the common names
        return Layout((MergedExperts(style),), name=f"{style} experts")
    return IDENTITY


def read_config(path: str) -> dict | None:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def detect_layout(path: str, style: str | None = None) -> Layout:
    """``layout_for_config`` of the checkpoint folder's config.json (identity without one)."""
    config = read_config(path)
    if config is None:
        return Layout((MergedExperts(style),), name=f"{style} experts") if style else IDENTITY
    return layout_for_config(config, style)
