"""config.json for an exported Megatron GPT model, from its TransformerConfig.

Built with transformers' own config class of the family, so the file is what
``AutoModelForCausalLM.from_pretrained`` of the installed transformers expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")


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


def family_of(config) -> str:
    """The HF family a Megatron config most likely came from."""
    if getattr(config, "multi_latent_attention", False):
        return "deepseek_v3"
    if config.num_moe_experts:
        return "qwen3_moe"
    if config.qk_layernorm:
        return "qwen3"
    if config.add_qkv_bias:
        return "qwen2"
    return "llama"


def _check_supported(config, family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if not config.gated_linear_unit or config.activation_func is not F.silu:
        raise ValueError("only SwiGLU MLPs (gated_linear_unit=True, activation_func=F.silu) map to "
                         f"the {family} family")
    if config.normalization != "RMSNorm":
        raise ValueError(f"the {family} family uses RMSNorm, the model uses {config.normalization}")
    if config.add_bias_linear:
        raise ValueError(f"the {family} family has no linear biases (add_bias_linear=False)")


def hf_config(model, family: str | None = None, vocab_size: int | None = None,
              dtype: torch.dtype | None = None) -> dict:
    """The HF config dict of ``model`` (a GPTModel, or any object with ``config``,
    ``max_sequence_length``, ``rotary_base``, ``share_embeddings_and_output_weights``)."""
    from dcp_hf.extras import require
    transformers = require("transformers", "hf", "generating config.json from a Megatron model")

    c = model.config
    family = family or family_of(c)
    _check_supported(c, family)
    heads = c.num_attention_heads
    common = dict(
        vocab_size=vocab_size or model.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=heads, max_position_embeddings=model.max_sequence_length,
        rms_norm_eps=c.layernorm_epsilon, rope_theta=float(model.rotary_base),
        tie_word_embeddings=bool(model.share_embeddings_and_output_weights), hidden_act="silu",
        dtype=str(dtype or c.params_dtype).removeprefix("torch."))
    gqa = dict(num_key_value_heads=c.num_query_groups or heads, head_dim=c.kv_channels)
    moe = moe_layers(c)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, **gqa, attention_bias=c.add_qkv_bias, mlp_bias=False)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, **gqa)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, **gqa, attention_bias=c.add_qkv_bias)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, **gqa, attention_bias=c.add_qkv_bias, num_experts=c.num_moe_experts,
            num_experts_per_tok=c.moe_router_topk, moe_intermediate_size=c.moe_ffn_hidden_size,
            decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(moe) if not m],
            norm_topk_prob=not c.moe_router_pre_softmax)
    else:
        dense = moe.index(True) if True in moe else len(moe)
        if not all(moe[dense:]):
            raise ValueError("DeepSeek-V3 needs every layer after the first MoE layer to be MoE, "
                             f"not {moe}")
        shared = c.moe_shared_expert_intermediate_size or 0
        rope = {}
        if getattr(c, "rope_type", None) == "yarn":
            rope = dict(rope_scaling=dict(
                type="yarn", factor=c.rotary_scaling_factor, beta_fast=c.beta_fast, beta_slow=c.beta_slow,
                mscale=c.mscale, mscale_all_dim=c.mscale_all_dim,
                original_max_position_embeddings=c.original_max_position_embeddings))
        cfg = transformers.DeepseekV3Config(
            **common, **rope, num_key_value_heads=heads, q_lora_rank=c.q_lora_rank,
            kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_head_dim,
            qk_rope_head_dim=c.qk_pos_emb_head_dim, v_head_dim=c.v_head_dim,
            n_routed_experts=c.num_moe_experts, moe_intermediate_size=c.moe_ffn_hidden_size,
            n_shared_experts=shared // c.moe_ffn_hidden_size if shared else 0,
            num_experts_per_tok=c.moe_router_topk, first_k_dense_replace=dense,
            routed_scaling_factor=c.moe_router_topk_scaling_factor or 1.0,
            n_group=c.moe_router_num_groups or 1, topk_group=c.moe_router_group_topk or 1,
            norm_topk_prob=True)
    out = cfg.to_dict()
    out["architectures"] = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return out


def megatron_config(hf: dict, **overrides):
    """The reverse: a TransformerConfig (MLATransformerConfig for DeepSeek-V3) and the GPTModel
    keyword arguments of an HF config dict of one of ``FAMILIES``. ``overrides`` go to the
    TransformerConfig (parallel sizes, dtypes, ``use_cpu_initialization``...)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not one of {FAMILIES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) maps to Megatron")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or {}
    kw = dict(num_layers=layers, hidden_size=hf["hidden_size"], num_attention_heads=heads,
              ffn_hidden_size=hf["intermediate_size"], normalization="RMSNorm",
              layernorm_epsilon=hf["rms_norm_eps"], gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, bias_activation_fusion=False, persist_layer_norm=False,
              hidden_dropout=0.0, attention_dropout=0.0)
    gpt = dict(vocab_size=hf["vocab_size"], max_sequence_length=hf["max_position_embeddings"],
               position_embedding_type="rope",
               rotary_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
               share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)))
    if family != "deepseek_v3":
        kw.update(num_query_groups=hf.get("num_key_value_heads") or heads,
                  kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
                  add_qkv_bias=family == "qwen2" or bool(hf.get("attention_bias")),
                  qk_layernorm=family.startswith("qwen3"))
    if family == "qwen3_moe":
        sparse = [i not in set(hf.get("mlp_only_layers") or []) and (i + 1) % hf.get("decoder_sparse_step", 1) == 0
                  for i in range(layers)]
        kw.update(num_moe_experts=hf.get("num_experts") or hf["num_local_experts"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
                  moe_router_topk=hf["num_experts_per_tok"], moe_layer_freq=_moe_layer_freq(sparse),
                  moe_router_pre_softmax=not hf.get("norm_topk_prob", False), moe_aux_loss_coeff=0.0)
    if family == "deepseek_v3":
        dense = hf.get("first_k_dense_replace", 0)
        kw.update(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                  qk_head_dim=hf["qk_nope_head_dim"], qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
                  v_head_dim=hf["v_head_dim"], rope_type="rope", qk_layernorm=True, rotary_base=gpt["rotary_base"],
                  num_moe_experts=hf["n_routed_experts"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
                  moe_router_topk=hf["num_experts_per_tok"],
                  moe_layer_freq=_moe_layer_freq([False] * dense + [True] * (layers - dense)),
                  moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"] or None,
                  moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_topk_scaling_factor=hf.get("routed_scaling_factor"),
                  moe_router_num_groups=hf.get("n_group"), moe_router_group_topk=hf.get("topk_group"),
                  moe_router_dtype="fp32", moe_aux_loss_coeff=0.0)
    kw.update(overrides)
    cls = MLATransformerConfig if family == "deepseek_v3" else TransformerConfig
    return cls(**kw), gpt


def _moe_layer_freq(sparse: list[bool]):
    """Megatron's moe_layer_freq: 1 when every layer is MoE (what training configs say, and
    what makes torch_dist stack the layers), else the per-layer pattern."""
    return 1 if all(sparse) else [int(s) for s in sparse]
