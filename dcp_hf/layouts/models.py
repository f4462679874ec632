"""Layouts of known model families, chosen from a checkpoint's config.json."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from dcp_hf.errors import CheckpointFormatError
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


@dataclass(frozen=True)
class MindSpeedModel:
    """A model whose merged experts MindSpeed-MM's ``moe_expert --style merge|split`` defines,
    as that tool reads it from the config: the config class, where the LLM's config sits, its
    expert-count and first-MoE-layer fields, the HF name of a layer's MLP, and the merged form."""

    config_class: str
    llm_config: tuple[str, ...]
    experts_fields: tuple[str, ...]  # the expert count, under any of these names
    mlp_key: str
    style: str
    first_moe_field: str | None = None  # layers below it are dense and stay as they are
    thinker: bool = False  # Qwen3-Omni: the merged checkpoint drops ``thinker.`` (see THINKER)


MINDSPEED_MODELS = {
    m.config_class: m
    for m in (
        # transformers 5 writes a Qwen3MoeConfig's num_experts as num_local_experts
        MindSpeedModel(
            "InternVLChatConfig",
            ("llm_config",),
            ("num_experts", "num_local_experts"),
            "language_model.model.layers.{layer}.mlp",
            "flat",
        ),
        MindSpeedModel(
            "Qwen3OmniMoeConfig",
            ("thinker_config", "text_config"),
            ("num_experts",),
            "thinker.model.layers.{layer}.mlp",
            "mindspeed",
            thinker=True,
        ),
        MindSpeedModel(
            "Glm4vMoeConfig",
            ("text_config",),
            ("n_routed_experts",),
            "model.language_model.layers.{layer}.mlp",
            "flat",
            first_moe_field="first_k_dense_replace",
        ),
    )
}
# The config classes of the model types above (InternVL3.5's is remote code, named in auto_map).
CONFIG_CLASSES = {
    "internvl_chat": "InternVLChatConfig",
    "qwen3_omni_moe": "Qwen3OmniMoeConfig",
    "glm4v_moe": "Glm4vMoeConfig",
}
# Qwen3-Omni: MindSpeed-MM's merged checkpoint (and in-memory model) strips ``thinker.`` from
# every key that has it; the other parts of the model keep their names.
THINKER = Prefix("", "thinker.", keep=("talker.", "code2wav."))


def config_class(config: dict) -> str | None:
    """The class ``AutoConfig.from_pretrained(..., trust_remote_code=True)`` makes of the config:
    the remote-code class of ``auto_map`` if any, else transformers' class of the model type."""
    remote = (config.get("auto_map") or {}).get("AutoConfig")
    if isinstance(remote, str):
        return remote.rsplit(".", 1)[-1]
    return CONFIG_CLASSES.get(config.get("model_type", ""))


def mindspeed_model(config: dict) -> MindSpeedModel | None:
    return MINDSPEED_MODELS.get(config_class(config))


def _int_field(model: MindSpeedModel, llm, names: tuple[str, ...], least: int) -> int:
    """The integer the LLM config holds under one of ``names`` (aliases of one setting)."""
    found = {n: llm[n] for n in names if isinstance(llm, dict) and n in llm}
    values = set(found.values())
    if len(values) == 1 and isinstance(v := values.pop(), int) and not isinstance(v, bool) and v >= least:
        return v
    where = ".".join(model.llm_config)
    got = f"got {found}" if found else "absent"
    raise CheckpointFormatError(
        f"config.json ({model.config_class}) needs {where}.{' or '.join(names)} (one integer "
        f">= {least}) to place its merged experts; {got}"
    )


def _mindspeed_layout(model: MindSpeedModel, config: dict, style: str | None) -> Layout:
    llm = _get(config, *model.llm_config)
    first = _int_field(model, llm, (model.first_moe_field,), 0) if model.first_moe_field else 0
    rule = MergedExperts(
        style or model.style,
        _int_field(model, llm, model.experts_fields, 1),
        mlp_key=model.mlp_key,
        first_layer=first,
        num_layers=_int_field(model, llm, ("num_hidden_layers",), 1),
    )
    return Layout((rule,), (THINKER,) if model.thinker else (), name=model.config_class)


def layout_for_config(config: dict, style: str | None = None) -> Layout:
    """``_family_layout`` plus the checkpoint's quantization (``quantization_config``)."""
    layout = _family_layout(config, style)
    quantization = quantization_for_config(config)
    if quantization is None:
        return layout
    rules = layout.rules
    if isinstance(quantization, MXFP4) and config.get("model_type") == "gpt_oss":
        rules = (GPT_OSS_EXPERTS,) + rules  # transformers' experts are the stored ones transposed
    return replace(layout, rules=rules, quantization=quantization, name=f"{layout.name}, {type(quantization).__name__}")


def _family_layout(config: dict, style: str | None = None) -> Layout:
    """The layout of a model given its config.json: which merged-experts style and names
    (``style`` overrides the family's default style), and its prefixes."""
    model_type = config.get("model_type", "")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown layout style {style!r}; one of {STYLES}")

    model = mindspeed_model(config)
    if model is not None:
        return _mindspeed_layout(model, config, style)
    if model_type == "mixtral":
        experts = config.get("num_local_experts")
        return Layout(
            (
                MergedExperts(
                    style or "transformers", experts, hf_gate="w1.weight", hf_up="w3.weight", hf_down="w2.weight"
                ),
            ),
            (Rename(".mlp.", ".block_sparse_moe."),),
            name="mixtral",
        )
    if model_type in TRANSFORMERS_MOE:
        experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
        return Layout((MergedExperts(style or "transformers", experts),), name=model_type)
    if style is not None:  # an unknown family with an explicit style: the common names
        return Layout((MergedExperts(style),), name=f"{style} experts")
    return IDENTITY


def read_config(path: str) -> dict | None:
    """The folder's config.json (a local folder or a URL), or None without one."""
    from dcp_hf.storage.hf_files import config_dict, parse_config
    from dcp_hf.storage.stores import is_url, open_store

    if is_url(path):
        store = open_store(path)
        where = path.rstrip("/") + "/config.json"
        return parse_config(store.read("config.json"), where) if store.exists("config.json") else None
    file = os.path.join(path, "config.json")
    return config_dict(file) if os.path.isfile(file) else None


def detect_layout(path: str, style: str | None = None) -> Layout:
    """``layout_for_config`` of the checkpoint folder's config.json (identity without one)."""
    config = read_config(path)
    if config is None:
        return Layout((MergedExperts(style),), name=f"{style} experts") if style else IDENTITY
    return layout_for_config(config, style)
