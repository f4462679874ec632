"""The HF family of a Megatron GPT model and its config.json, exact or refused.

A family is named by an HF config (``model_type``), by ``family=``, or inferred from the
TransformerConfig when exactly one family can express it. ``hf_config`` builds config.json with
transformers' own config class of the family from every setting of the TransformerConfig and
GPTModel that the family's HF config can express, and raises ``UnexpressibleError`` listing the
settings it cannot express (nothing is dropped silently). ``check_given`` compares a config.json
given by the user with the model's.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from dcp_hf.megatron.config_fields import unexpressed

GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """An HF model family as the Megatron layout and config.json see it. ``moe_block``: the
    HF module of the router and routed experts; ``expert_names``: an expert's (gate, up, down)
    linears; ``shared_experts``: the HF module of the shared experts; ``mtp``: its config
    counts multi-token-prediction layers (``num_nextn_predict_layers``); ``inferred``: whether
    a TransformerConfig alone may name it (Mistral is never inferred: what it expresses, Llama
    expresses with the same tensors)."""

    name: str
    config_class: str
    attention: str = "gqa"
    moe: bool = False
    moe_block: str = "mlp"
    expert_names: tuple[str, str, str] = GATE_UP_DOWN
    shared_experts: str = "shared_experts"
    mtp: bool = False
    inferred: bool = True

    @property
    def architecture(self) -> str:
        return self.config_class.replace("Config", "ForCausalLM")


FAMILY_LIST = (
    Family("llama", "LlamaConfig"),
    Family("mistral", "MistralConfig", inferred=False),
    Family("qwen2", "Qwen2Config"),
    Family("qwen3", "Qwen3Config"),
    Family("qwen2_moe", "Qwen2MoeConfig", moe=True, shared_experts="shared_expert"),
    Family("qwen3_moe", "Qwen3MoeConfig", moe=True),
    Family("mixtral", "MixtralConfig", moe=True, moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    Family("glm4_moe", "Glm4MoeConfig", moe=True, mtp=True),
    Family("deepseek_v2", "DeepseekV2Config", attention="mla", moe=True),
    Family("deepseek_v3", "DeepseekV3Config", attention="mla", moe=True, mtp=True),
)
BY_NAME = {f.name: f for f in FAMILY_LIST}
FAMILIES = tuple(BY_NAME)
SIGMOID_ROUTER = ("glm4_moe", "deepseek_v3")  # sigmoid scores, expert bias, top-k renormalized


class UnexpressibleError(ValueError):
    """The Megatron model has settings the family's HF config cannot express."""


@dataclass(frozen=True)
class GPTSettings:
    """What decides a Megatron GPT model's function beside its weights: its TransformerConfig
    and the GPTModel arguments (vocab, embeddings, RoPE; ``inv_freq``: Megatron's rotary
    frequencies, None without GQA RoPE). Of a built model (``of_model``), or of a
    TransformerConfig and GPTModel keyword arguments (``of_config``: what ``megatron_config``
    returns, what an importer builds, what a Megatron-LM checkpoint's arguments say)."""

    config: object
    vocab_size: int
    max_sequence_length: int
    share_embeddings_and_output_weights: bool
    position_embedding_type: str
    rotary_base: float
    rotary_percent: float
    rotary_scaling: bool
    seq_len_interpolation_factor: float | None
    inv_freq: torch.Tensor | None

    @classmethod
    def of_model(cls, model) -> "GPTSettings":
        if isinstance(model, GPTSettings):
            return model
        rotary = getattr(model, "rotary_pos_emb", None)
        return cls(
            config=model.config,
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_sequence_length,
            share_embeddings_and_output_weights=bool(model.share_embeddings_and_output_weights),
            position_embedding_type=getattr(model, "position_embedding_type", "rope"),
            rotary_base=model.rotary_base,
            rotary_percent=getattr(model, "rotary_percent", 1.0),
            rotary_scaling=bool(getattr(model, "rotary_scaling", False)),
            seq_len_interpolation_factor=getattr(rotary, "seq_len_interpolation_factor", None),
            inv_freq=getattr(rotary, "inv_freq", None),
        )

    @classmethod
    def of_config(cls, config, gpt: dict) -> "GPTSettings":
        """``gpt``: GPTModel keyword arguments (its defaults for those left out); the rotary
        frequencies are those megatron-core's RotaryEmbedding computes from them, as GPTModel
        builds it."""
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.models.gpt.gpt_model import GPTModel

        defaults = {
            k: p.default for k, p in inspect.signature(GPTModel.__init__).parameters.items() if p.default is not p.empty
        }
        g = {**defaults, **gpt}
        mla = bool(getattr(config, "multi_latent_attention", False))
        rope = g["position_embedding_type"] == "rope" and not mla
        inv_freq = None
        if rope:
            inv_freq = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=g["rotary_percent"],
                rotary_interleaved=config.rotary_interleaved,
                seq_len_interpolation_factor=g["seq_len_interpolation_factor"],
                rotary_base=g["rotary_base"],
                rope_scaling=g["rope_scaling"],
                rope_scaling_factor=g["rope_scaling_factor"],
                use_cpu_initialization=True,
            ).inv_freq
        return cls(
            config=config,
            vocab_size=g["vocab_size"],
            max_sequence_length=g["max_sequence_length"],
            share_embeddings_and_output_weights=bool(g["share_embeddings_and_output_weights"]),
            position_embedding_type=g["position_embedding_type"],
            rotary_base=config.rotary_base if hasattr(config, "rotary_base") else g["rotary_base"],
            rotary_percent=g["rotary_percent"],
            rotary_scaling=bool(g["rope_scaling"]),
            seq_len_interpolation_factor=g["seq_len_interpolation_factor"] if rope else None,
            inv_freq=inv_freq,
        )


def family_named(name: str) -> Family:
    if name not in BY_NAME:
        raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")
    return BY_NAME[name]


def family_of_hf(hf: dict) -> Family:
    """The family of an HF config dict: its ``model_type``, checked against ``architectures``."""
    model_type = hf.get("model_type")
    if model_type not in BY_NAME:
        raise ValueError(
            f"HF config model_type {model_type!r} is not a family dcp-hf maps to Megatron; one of {FAMILIES}"
        )
    fam = BY_NAME[model_type]
    archs = hf.get("architectures") or []
    if archs and fam.architecture not in archs:
        raise ValueError(
            f"HF config: model_type {model_type!r} is built as {fam.architecture}, but architectures says {archs}"
        )
    return fam


def resolve_family(model, hf: dict | None = None, family: str | None = None) -> Family:
    """The family of a model: from the HF config when given (``family`` must agree), else
    ``family``, else the one family whose HF config expresses the model's TransformerConfig
    (an error naming the candidates when there are several or none)."""
    if hf is not None:
        fam = family_of_hf(hf)
        if family is not None and family != fam.name:
            raise ValueError(f"family={family!r} but the HF config says model_type {fam.name!r}")
        return fam
    if family is not None:
        return family_named(family)
    fits, refused = [], {}
    for fam in FAMILY_LIST:
        if not fam.inferred:
            continue
        try:
            hf_config(model, fam.name)
            fits.append(fam)
        except UnexpressibleError as e:
            refused[fam.name] = str(e)
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise ValueError(
            f"the Megatron config fits several HF families: {[f.name for f in fits]}; pass "
            f"config= (the HF config.json) or family= to say which"
        )
    why = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
    raise ValueError(f"no HF family expresses this Megatron config ({why})")


def moe_layers(config) -> list[bool]:
    """Which layers are MoE layers (Megatron's ``moe_layer_freq``: every k-th, or a pattern)."""
    n = config.num_layers
    if not config.num_moe_experts:
        return [False] * n
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(n)]
    if len(freq) != n:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries for {n} layers")
    return [bool(x) for x in freq]


class _Refusals:
    """Collects what a family cannot express, to raise it all at once."""

    def __init__(self, family: str):
        self.family, self.reasons = family, []

    def need(self, ok: bool, reason: str) -> None:
        if not ok:
            self.reasons.append(reason)

    def raise_any(self) -> None:
        if self.reasons:
            raise UnexpressibleError(f"the {self.family} HF config cannot express: " + "; ".join(self.reasons))


def hf_config(
    model, family: str | None = None, vocab_size: int | None = None, dtype: torch.dtype | None = None
) -> dict:
    """The HF config dict of ``model`` (a GPTModel, or its GPTSettings) for ``family``
    (default: inferred, see ``resolve_family``). Raises UnexpressibleError naming every
    setting the family cannot express."""
    _transformers()  # before anything else: a missing extra is named, not an AttributeError
    model = GPTSettings.of_model(model)
    fam = family_named(family) if family else resolve_family(model)
    kw = _settings(model, fam)
    kw.update(
        vocab_size=vocab_size or model.vocab_size, dtype=str(dtype or model.config.params_dtype).removeprefix("torch.")
    )
    out = _config_class(fam)(**kw).to_dict()
    out["architectures"] = [fam.architecture]
    return out


def _transformers():
    from dcp_hf.extras import require

    return require("transformers", "hf", "generating config.json from a Megatron model")


def _config_class(fam: Family):
    return getattr(_transformers(), fam.config_class)


def _settings(model: GPTSettings, fam: Family) -> dict:
    """The family's config settings that the Megatron model determines (checked: every one
    is expressed exactly, and the model sets nothing else that changes its math, else
    UnexpressibleError)."""
    no = _Refusals(fam.name)
    mla = bool(getattr(model.config, "multi_latent_attention", False))
    no.need(mla == (fam.attention == "mla"), "multi-latent attention" if mla else "attention other than MLA")
    no.raise_any()
    kw = _common(model, fam, no)
    kw.update(_gqa(model, fam, no) if fam.attention == "gqa" else _mla(model.config, fam, no))
    kw.update(_moe(model.config, fam, no))
    no.raise_any()
    unknown = [k for k in kw if not hasattr(_config_class(fam)(), k) and k != "head_dim"]
    if unknown:  # a setting the class would keep as an unused extra (GLM-4.5 reads head_dim so)
        raise AssertionError(f"{fam.config_class} has no {unknown}")
    if fam.attention == "gqa":
        _check_rope(model, fam, _config_class(fam)(**kw), no)
        no.raise_any()
    return kw


def _common(model, fam: Family, no: _Refusals) -> dict:
    c = model.config
    for reason in unexpressed(c):  # config_fields.FIELDS: what no family's config.json expresses
        no.need(False, reason)
    no.need(
        c.gated_linear_unit and c.activation_func is F.silu,
        "an MLP other than SwiGLU (gated_linear_unit=True, activation_func=F.silu)",
    )
    no.need(c.normalization == "RMSNorm", f"normalization={c.normalization!r} (RMSNorm only)")
    no.need(
        model.position_embedding_type == "rope",
        f"position_embedding_type={model.position_embedding_type!r} (rope only)",
    )
    no.need(
        model.seq_len_interpolation_factor is None,
        f"seq_len_interpolation_factor={model.seq_len_interpolation_factor} (linear RoPE interpolation)",
    )
    mtp = getattr(c, "mtp_num_layers", None) or 0
    no.need(fam.mtp or not mtp, f"mtp_num_layers={mtp} (multi-token prediction layers)")
    out = dict(
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=model.max_sequence_length,
        rms_norm_eps=c.layernorm_epsilon,
        tie_word_embeddings=bool(model.share_embeddings_and_output_weights),
        hidden_act="silu",
    )
    if fam.mtp:
        out["num_nextn_predict_layers"] = mtp
        no.need(not mtp or not out["tie_word_embeddings"], "multi-token prediction with tied embeddings")
    return out


def _gqa(model, fam: Family, no: _Refusals) -> dict:
    c = model.config
    heads = c.num_attention_heads
    groups = c.num_query_groups or heads
    out = dict(num_key_value_heads=groups)
    if fam.name in ("mistral", "mixtral"):  # MistralConfig's default is a 4096-token window
        out["sliding_window"] = None
    if fam.name in ("qwen2", "qwen2_moe"):  # no head_dim setting: hidden / heads
        no.need(
            c.kv_channels * heads == c.hidden_size,
            f"kv_channels={c.kv_channels} other than hidden_size / heads ({c.hidden_size // heads})",
        )
    else:
        out["head_dim"] = c.kv_channels
    bias = c.add_qkv_bias
    if fam.name in ("qwen2", "qwen2_moe"):
        no.need(bias, "q/k/v without bias (add_qkv_bias=False)")
    elif fam.name == "glm4_moe":
        out["attention_bias"] = bias
    else:  # Llama/Qwen3's attention_bias also biases o_proj; Mistral/Mixtral have none
        no.need(not bias, "add_qkv_bias=True (q/k/v bias without an o_proj bias)")
    if fam.name in ("qwen3", "qwen3_moe"):
        no.need(c.qk_layernorm, "attention without qk norm (qk_layernorm=False)")
    elif fam.name == "glm4_moe":
        out["use_qk_norm"] = c.qk_layernorm
    else:
        no.need(not c.qk_layernorm, "qk_layernorm=True")
    rope = dict(rope_type="default", rope_theta=float(model.rotary_base))
    percent = model.rotary_percent
    if percent != 1.0:
        no.need(fam.name == "glm4_moe", f"rotary_percent={percent} (partial rotary)")
        rope["partial_rotary_factor"] = percent
    elif fam.name == "glm4_moe":
        rope["partial_rotary_factor"] = 1.0
    if model.rotary_scaling:
        rope.update(_llama3_rope(model))
    out["rope_parameters"] = rope
    return out


def _llama3_rope(model) -> dict:
    """Megatron's RoPE scaling (``rope_scaling=True``) is Llama-3's with low/high frequency
    factors 1/4 and 8192 original positions; its factor is not kept, so it is read back from
    the scaled frequencies (any frequency with wavelength beyond 8192/4 carries it; where none
    does, the factor changes nothing and Megatron's default 8 is written). Megatron computes
    them in fp32, so the factor is rounded to 3 decimals; ``_check_rope`` then verifies that
    transformers' frequencies from it are Megatron's."""
    low, high, original = 1.0, 4.0, 8192
    inv = model.inv_freq.double().cpu()
    dim = inv.numel() * 2
    base = 1.0 / (float(model.rotary_base) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = 8.0
    for b, s in zip(base.tolist(), inv.tolist()):
        wavelen = 2 * math.pi / b
        if wavelen > original / low:
            factor = b / s
            break
        if wavelen > original / high:
            smooth = (original / wavelen - low) / (high - low)
            factor = (1 - smooth) * b / (s - smooth * b)
            break
    return dict(
        rope_type="llama3",
        factor=round(factor, 3),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=original,
    )


def _check_rope(model, fam: Family, cfg, no: _Refusals) -> None:
    """The rotary frequencies transformers computes from the config must be Megatron's."""
    prefix = fam.config_class.removesuffix("Config")
    module = importlib.import_module(f"transformers.models.{fam.name}.modeling_{fam.name}")
    rotary = getattr(module, f"{prefix}RotaryEmbedding")(cfg)
    theirs = rotary.inv_freq.double()
    ours = model.inv_freq.double().cpu()
    same = theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-5, atol=0)
    no.need(
        same,
        f"the rotary frequencies (transformers computes {list(theirs.shape)} from "
        f"{cfg.rope_parameters}, Megatron has {list(ours.shape)} other values)",
    )
    no.need(getattr(rotary, "attention_scaling", 1.0) == 1.0, "RoPE attention scaling")


def _mla(c, fam: Family, no: _Refusals) -> dict:
    no.need(c.qk_layernorm, "MLA without the latent layer norms (qk_layernorm=False)")
    no.need(not c.add_qkv_bias, "add_qkv_bias=True")
    rope_type = getattr(c, "rope_type", "rope")
    no.need(  # Megatron's MLA scales the softmax by YaRN's mscale even with plain RoPE
        rope_type == "yarn" or c.rotary_scaling_factor <= 1 or not c.mscale_all_dim,
        f"mscale_all_dim={c.mscale_all_dim} with rope_type='rope' (a softmax scale transformers does not apply)",
    )
    rope = dict(rope_type="default", rope_theta=float(c.rotary_base))
    if rope_type == "yarn":
        rope.update(
            rope_type="yarn",
            factor=c.rotary_scaling_factor,
            beta_fast=c.beta_fast,
            beta_slow=c.beta_slow,
            mscale=c.mscale,
            mscale_all_dim=c.mscale_all_dim,
            original_max_position_embeddings=c.original_max_position_embeddings,
        )
    else:
        no.need(rope_type == "rope", f"rope_type={rope_type!r}")
    no.need(c.rotary_percent == 1.0, f"rotary_percent={c.rotary_percent} with MLA")
    out = dict(
        num_key_value_heads=c.num_attention_heads,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_head_dim,
        qk_rope_head_dim=c.qk_pos_emb_head_dim,
        v_head_dim=c.v_head_dim,
        rope_parameters=rope,
    )
    if fam.name == "deepseek_v3":
        out["rope_interleave"] = True  # Megatron's MLA rotates de-interleaved pairs, as HF's interleave
    return out


def _moe(c, fam: Family, no: _Refusals) -> dict:
    experts = c.num_moe_experts
    if not fam.moe:
        no.need(not experts, f"num_moe_experts={experts} (MoE layers)")
        return {}
    no.need(bool(experts), "a dense model (num_moe_experts unset)")
    if not experts:
        return {}
    moe = moe_layers(c)
    dense = moe.index(True) if True in moe else len(moe)
    topk, score = c.moe_router_topk, c.moe_router_score_function
    factor = c.moe_router_topk_scaling_factor
    groups, group_topk = c.moe_router_num_groups, c.moe_router_group_topk
    shared = c.moe_shared_expert_intermediate_size or 0
    bias = c.moe_router_enable_expert_bias
    out = dict(num_experts_per_tok=topk, moe_intermediate_size=c.moe_ffn_hidden_size)
    name = fam.name
    sigmoid = name in SIGMOID_ROUTER
    no.need(score == ("sigmoid" if sigmoid else "softmax"), f"moe_router_score_function={score!r}")
    no.need(bias == sigmoid, f"moe_router_enable_expert_bias={bias}")
    no.need(not c.moe_shared_expert_gate or name == "qwen2_moe", "moe_shared_expert_gate=True")
    if name in ("qwen2_moe", "qwen3_moe", "mixtral"):
        no.need(not factor or factor == 1.0, f"moe_router_topk_scaling_factor={factor}")
        no.need(not groups or groups == 1, f"group-limited routing (moe_router_num_groups={groups})")
    if name in ("glm4_moe", "deepseek_v2", "deepseek_v3"):
        no.need(
            moe == [False] * dense + [True] * (len(moe) - dense),
            f"moe_layer_freq {c.moe_layer_freq}: not dense layers followed by MoE layers only",
        )
        no.need(
            shared > 0 and shared % c.moe_ffn_hidden_size == 0,
            f"moe_shared_expert_intermediate_size={shared or None} (a positive multiple of "
            f"moe_ffn_hidden_size={c.moe_ffn_hidden_size})",
        )
        out.update(
            n_routed_experts=experts,
            first_k_dense_replace=dense,
            n_shared_experts=shared // c.moe_ffn_hidden_size,
            routed_scaling_factor=factor or 1.0,
            n_group=groups or 1,
            topk_group=group_topk or 1,
        )
    if sigmoid:
        out["norm_topk_prob"] = True
        no.need(topk > 1, "top-1 sigmoid routing (Megatron does not renormalize a single score)")
        no.need(
            not groups or groups == 1 or topk // group_topk == 2,
            f"group scores from the top {topk // (group_topk or 1)} experts (transformers sums the top 2)",
        )
    if name == "deepseek_v2":  # softmax over all experts, no renormalization, then the scaling
        no.need(c.moe_router_pre_softmax, "moe_router_pre_softmax=False (top-k renormalized)")
        grouped = bool(groups and groups > 1)
        no.need(
            not grouped or topk // group_topk == 1,
            f"group scores from the top {topk // (group_topk or 1)} experts (transformers takes the max)",
        )
        out["topk_method"] = "group_limited_greedy" if grouped else "greedy"
    if name == "mixtral":
        no.need(moe == [True] * len(moe), f"dense layers (moe_layer_freq {c.moe_layer_freq})")
        no.need(not c.moe_router_pre_softmax, "moe_router_pre_softmax=True (Mixtral renormalizes the top k)")
        no.need(not shared, f"shared experts ({shared})")
        out.update(num_local_experts=experts, intermediate_size=out.pop("moe_intermediate_size"))
    if name in ("qwen2_moe", "qwen3_moe"):
        out.update(
            num_experts=experts,
            decoder_sparse_step=1,
            norm_topk_prob=not c.moe_router_pre_softmax,
            mlp_only_layers=[i for i, m in enumerate(moe) if not m],
        )
    if name == "qwen3_moe":
        no.need(not shared, f"shared experts ({shared})")
    if name == "qwen2_moe":
        no.need(
            shared > 0 and c.moe_shared_expert_gate,
            "MoE without a gated shared expert (moe_shared_expert_intermediate_size and moe_shared_expert_gate=True)",
        )
        out["shared_expert_intermediate_size"] = shared
    return out


def check_given(given: dict, model, family: Family, loading: bool = False) -> None:
    """A config.json given for ``model`` must describe it: every setting the family's config
    takes from the Megatron model equal (both through transformers' config class, so defaults
    compare as the class fills them; MoE layer patterns compared layer by layer), the vocab no
    larger than the model's. ``loading`` a checkpoint: tied and untied embeddings load into
    either, and its MTP layers may be left out (a model without MTP layers)."""
    cls = _config_class(family)
    model = GPTSettings.of_model(model)
    kw = _settings(model, family)
    theirs = dict(given)
    if family.name in ("qwen2_moe", "qwen3_moe"):  # decoder_sparse_step and mlp_only_layers -> one list
        step, dense = theirs.get("decoder_sparse_step") or 1, set(theirs.get("mlp_only_layers") or [])
        theirs["mlp_only_layers"] = [i for i in range(theirs["num_hidden_layers"]) if i in dense or (i + 1) % step]
        theirs["decoder_sparse_step"] = 1
    ours, theirs = cls(**kw), cls.from_dict(theirs)  # attribute names and defaults as the class has them
    free = {"max_position_embeddings"}  # the training sequence length, not a model property
    if loading:
        free.add("tie_word_embeddings")
        if not getattr(model.config, "mtp_num_layers", None):
            free.add("num_nextn_predict_layers")
    if family.name != "mixtral" and all(moe_layers(model.config)):
        free.add("intermediate_size")  # no dense layer uses it
    # every setting of the given config that changes the math, also those the family's class
    # has and the model does not set (a sliding window, an MLP bias...): equal to the class's
    # value for the model (its default where the model does not set it)
    keys = (set(kw) | set(theirs.to_dict()) | set(ours.to_dict())) - HF_NOT_MATH - {"vocab_size"}
    differ = [
        f"{k}: {getattr(theirs, k, None)!r} given, {getattr(ours, k, None)!r} in the model"
        for k in sorted(keys)
        if k not in free and _unset(k, getattr(theirs, k, None)) != _unset(k, getattr(ours, k, None))
    ]
    vocab = given.get("vocab_size")
    if vocab is not None and vocab > model.vocab_size:
        differ.append(f"vocab_size: {vocab} given, the model has {model.vocab_size} rows")
    if differ:
        raise ValueError(f"the given {family.name} config does not describe this Megatron model: " + "; ".join(differ))


HF_NOT_MATH = {  # HF config fields that do not change a causal LM's function
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "id2label",
    "label2id",
    "problem_type",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "use_cache",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
    "initializer_range",
    "attention_dropout",
    "router_aux_loss_coef",
    "router_jitter_noise",  # training noise
    "pretraining_tp",  # a way to split Llama's matmuls, the same function
    "use_sliding_window",  # with max_window_layers: their effect is layer_types and sliding_window
    "max_window_layers",
    "quantization_config",  # how the release stores its weights (dequantized on load)
    "tokenizer_class",
}
UNSET_MEANS = {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0}  # None says the same


def _unset(key, value):
    return UNSET_MEANS.get(key, value) if value is None else value


def megatron_config(hf: dict, **overrides):
    """The reverse: a TransformerConfig (MLATransformerConfig for DeepSeek) and the GPTModel
    keyword arguments of an HF config dict of one of ``FAMILIES``. ``overrides`` go to the
    TransformerConfig (parallel sizes, dtypes, ``use_cpu_initialization``, ``mtp_num_layers``...).
    Multi-token-prediction layers are built only when ``mtp_num_layers`` is passed."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    fam = family_of_hf(hf)
    family = fam.name
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) maps to Megatron")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or {}
    kw = dict(
        num_layers=layers,
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf["rms_norm_eps"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    gpt = dict(
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rotary_percent=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
    )
    if rope.get("rope_type", "default") == "llama3":
        gpt.update(rope_scaling=True, rope_scaling_factor=rope["factor"])
    if fam.attention == "gqa":
        kw.update(
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
            add_qkv_bias=family in ("qwen2", "qwen2_moe") or bool(hf.get("attention_bias")),
            qk_layernorm=family.startswith("qwen3") or bool(hf.get("use_qk_norm")),
        )
    moe = dict(
        moe_ffn_hidden_size=hf.get("moe_intermediate_size"),
        moe_router_topk=hf.get("num_experts_per_tok"),
        moe_aux_loss_coeff=0.0,
    )
    if family in ("qwen2_moe", "qwen3_moe"):
        sparse = [
            i not in set(hf.get("mlp_only_layers") or []) and (i + 1) % hf.get("decoder_sparse_step", 1) == 0
            for i in range(layers)
        ]
        kw.update(
            moe,
            num_moe_experts=hf.get("num_experts") or hf["num_local_experts"],
            moe_layer_freq=_moe_layer_freq(sparse),
            moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        )
        if family == "qwen2_moe":
            kw.update(
                moe_shared_expert_intermediate_size=hf["shared_expert_intermediate_size"], moe_shared_expert_gate=True
            )
    if family == "mixtral":
        kw.update(moe, num_moe_experts=hf["num_local_experts"], moe_ffn_hidden_size=hf["intermediate_size"])
    if family in ("glm4_moe", "deepseek_v2", "deepseek_v3"):
        dense = hf.get("first_k_dense_replace", 0)
        groups = hf.get("n_group") or 1
        kw.update(
            moe,
            num_moe_experts=hf["n_routed_experts"],
            moe_layer_freq=_moe_layer_freq([False] * dense + [True] * (layers - dense)),
            moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"] or None,
            moe_router_topk_scaling_factor=hf.get("routed_scaling_factor"),
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=hf.get("topk_group") if groups > 1 else None,
            moe_router_dtype="fp32",
        )
        if family in SIGMOID_ROUTER:
            kw.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
        else:
            kw.update(moe_router_pre_softmax=True)
    if fam.attention == "mla":
        kw.update(
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_head_dim=hf["qk_nope_head_dim"],
            qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_type="rope",
            qk_layernorm=True,
            rotary_base=gpt["rotary_base"],
        )
    kw.update(overrides)
    cls = MLATransformerConfig if fam.attention == "mla" else TransformerConfig
    return cls(**kw), gpt


def checked_megatron_config(hf: dict, **overrides):
    """``megatron_config``, exact or refused: the family of ``hf`` must be one of ``FAMILIES``
    (Gemma, Llama-4, Phi-3, OLMoE, GPT-OSS, Qwen3-Next... are refused by name) and the Megatron
    model it describes must compute what transformers computes from ``hf`` (``check_given`` of
    that model's settings: a sliding window, an MLP bias, a RoPE type the model would not
    apply is refused). For every path that goes from an HF config to a Megatron model or
    checkpoint (export's layout, an import). Returns (Family, TransformerConfig, GPTModel
    keyword arguments); multi-token-prediction layers only when ``mtp_num_layers`` is passed."""
    fam = family_of_hf(hf)
    config, gpt = megatron_config(hf, **overrides)
    check_given(hf, GPTSettings.of_config(config, gpt), fam, loading=True)
    return fam, config, gpt


def _moe_layer_freq(sparse: list[bool]):
    """Megatron's moe_layer_freq: 1 when every layer is MoE (what training configs say, and
    what makes torch_dist stack the layers), else the per-layer pattern."""
    return 1 if all(sparse) else [int(s) for s in sparse]
