"""Every field of megatron-core's TransformerConfig (with MLATransformerConfig and
ModelParallelConfig), classified once: what an HF config.json must express, what no family
expresses (refused unless at its default), and what does not change the model's function.

``unexpressed(config)`` lists the refused settings a config holds, and every field this table
does not know (a later megatron-core's) set to a value other than its default: nothing
unknown is exported silently. ``tests/test_megatron_trust.py`` checks that every dataclass
field of the installed megatron-core is classified here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Expressed:
    """A setting a family's HF config carries (``hf``: the config field); checked by
    ``hf_config._settings``."""

    hf: str


@dataclass(frozen=True)
class Refused:
    """A setting that changes the math and that no family's config expresses: refused unless
    ``ok(config)`` (default: the field holds its dataclass default)."""

    what: str
    ok: Callable | None = None


@dataclass(frozen=True)
class NotMath:
    """A setting that leaves the model's function (inference, in eval mode) unchanged:
    parallelism, precision and kernels, recomputation, initialization, training losses and
    regularizers, logging."""

    why: str


PARALLEL = NotMath("parallelism or communication")
KERNEL = NotMath("a kernel, fusion or implementation choice")
PRECISION = NotMath("numeric precision of the computation, not the function")
TRAINING = NotMath("training only (losses, regularizers, optimizer-side updates)")
MEMORY = NotMath("activation memory: recomputation, offloading, CUDA graphs")
INIT = NotMath("initialization of the weights (the checkpoint holds them)")
LOGGING = NotMath("logging or debugging")


def _softmax_scale_ok(c) -> bool:  # None: Megatron's 1/sqrt(head dim), what transformers computes
    if c.softmax_scale is None or getattr(c, "multi_latent_attention", False):  # MLA computes its own
        return True
    return math.isclose(c.softmax_scale, 1 / math.sqrt(c.kv_channels), rel_tol=1e-12)


def _no_rope_ok(c) -> bool:  # a per-layer pattern of zeros: RoPE in every layer
    freq = c.no_rope_freq
    return not freq or (isinstance(freq, list) and not any(freq))


FIELDS: dict[str, Expressed | Refused | NotMath] = {
    # --- shapes
    "num_layers": Expressed("num_hidden_layers"),
    "hidden_size": Expressed("hidden_size"),
    "ffn_hidden_size": Expressed("intermediate_size"),
    "num_attention_heads": Expressed("num_attention_heads"),
    "num_query_groups": Expressed("num_key_value_heads"),
    "kv_channels": Expressed("head_dim (Qwen2: hidden_size / num_attention_heads)"),
    "mtp_num_layers": Expressed("num_nextn_predict_layers (GLM-4.5, DeepSeek-V3; refused elsewhere)"),
    # --- norms, residuals, biases, activation
    "normalization": Expressed("RMSNorm only (rms_norm_eps); LayerNorm refused"),
    "layernorm_epsilon": Expressed("rms_norm_eps"),
    "layernorm_zero_centered_gamma": Refused("zero-centred norm weights (1 + gamma)"),
    "apply_residual_connection_post_layernorm": Refused("the residual taken after the norm"),
    "add_bias_linear": Refused("biases on every linear layer", lambda c: not c.add_bias_linear),
    "add_qkv_bias": Expressed("q/k/v bias: Qwen2 always, GLM-4.5 attention_bias; refused elsewhere"),
    "gated_linear_unit": Expressed("hidden_act silu with gate_proj/up_proj (SwiGLU only)"),
    "activation_func": Expressed("hidden_act (silu only)"),
    "glu_linear_offset": Refused("an offset added to the GLU's linear half"),
    "activation_func_clamp_value": Refused("clamping of the GLU's inputs"),
    "use_te_activation_func": KERNEL,
    "activation_func_fp8_input_store": PRECISION,
    "use_fused_weighted_squared_relu": KERNEL,
    # --- attention
    "softmax_scale": Refused("an attention softmax scale other than 1/sqrt(head dim)", _softmax_scale_ok),
    "softmax_type": Refused("softmax with an offset (off-by-one) or learnable sinks (GPT-OSS)"),
    "qk_layernorm": Expressed("q/k norm: Qwen3 always, GLM-4.5 use_qk_norm, MLA latent norms; refused elsewhere"),
    "qk_l2_norm": Refused("L2-normalized queries and keys"),
    "rotary_interleaved": Refused("interleaved RoPE pairs"),
    "window_size": Refused("sliding-window attention"),
    "window_attn_skip_freq": Refused("layers that skip the sliding window"),
    "no_rope_freq": Refused("layers without RoPE (NoPE)", _no_rope_ok),
    "attention_output_gate": Refused("a gate on the attention output (Qwen3-Next)"),
    "multi_latent_attention": Expressed("the family's attention (DeepSeek-V2/V3: MLA)"),
    "experimental_attention_variant": Refused("gated delta net (Qwen3-Next linear attention) or DSA"),
    "linear_attention_freq": Refused("linear-attention layers (Qwen3-Next)"),
    "dsa_indexer_n_heads": Refused("the DSA indexer"),
    "dsa_indexer_head_dim": Refused("the DSA indexer"),
    "dsa_indexer_topk": Refused("the DSA indexer"),
    "dsa_indexer_loss_coeff": TRAINING,
    "dsa_indexer_use_sparse_loss": TRAINING,
    "linear_conv_kernel_dim": Refused("gated delta net shapes"),
    "linear_key_head_dim": Refused("gated delta net shapes"),
    "linear_value_head_dim": Refused("gated delta net shapes"),
    "linear_num_key_heads": Refused("gated delta net shapes"),
    "linear_num_value_heads": Refused("gated delta net shapes"),
    "mrope_section": Refused("multimodal RoPE sections"),
    "apply_query_key_layer_scaling": PRECISION,  # scales by the layer number and back in the softmax
    "attention_softmax_in_fp32": PRECISION,
    "attention_backend": KERNEL,
    "qk_clip": TRAINING,  # QK-clip rescales weights after optimizer steps
    "qk_clip_alpha": TRAINING,
    "qk_clip_threshold": TRAINING,
    "log_max_attention_logit": LOGGING,
    "flash_decode": KERNEL,
    # --- MLA (MLATransformerConfig)
    "q_lora_rank": Expressed("q_lora_rank"),
    "kv_lora_rank": Expressed("kv_lora_rank"),
    "qk_head_dim": Expressed("qk_nope_head_dim"),
    "qk_pos_emb_head_dim": Expressed("qk_rope_head_dim"),
    "v_head_dim": Expressed("v_head_dim"),
    "rope_type": Expressed("rope_parameters.rope_type (rope or yarn)"),
    "rotary_base": Expressed("rope_parameters.rope_theta"),
    "rotary_percent": Expressed("partial_rotary_factor (GLM-4.5; refused elsewhere)"),
    "rotary_scaling_factor": Expressed("rope_parameters.factor (yarn)"),
    "original_max_position_embeddings": Expressed("rope_parameters.original_max_position_embeddings (yarn)"),
    "beta_fast": Expressed("rope_parameters.beta_fast (yarn)"),
    "beta_slow": Expressed("rope_parameters.beta_slow (yarn)"),
    "mscale": Expressed("rope_parameters.mscale (yarn)"),
    "mscale_all_dim": Expressed("rope_parameters.mscale_all_dim (yarn)"),
    "cache_mla_latents": KERNEL,
    # --- MoE
    "num_moe_experts": Expressed("num_experts / num_local_experts / n_routed_experts"),
    "moe_layer_freq": Expressed("mlp_only_layers / first_k_dense_replace"),
    "moe_ffn_hidden_size": Expressed("moe_intermediate_size"),
    "moe_shared_expert_intermediate_size": Expressed("shared_expert_intermediate_size / n_shared_experts"),
    "moe_shared_expert_gate": Expressed("shared_expert_gate (Qwen2-MoE)"),
    "moe_router_topk": Expressed("num_experts_per_tok"),
    "moe_router_num_groups": Expressed("n_group"),
    "moe_router_group_topk": Expressed("topk_group"),
    "moe_router_pre_softmax": Expressed("norm_topk_prob / the family's routing"),
    "moe_router_topk_scaling_factor": Expressed("routed_scaling_factor"),
    "moe_router_score_function": Expressed("the family's router (softmax or sigmoid)"),
    "moe_router_enable_expert_bias": Expressed("e_score_correction_bias (GLM-4.5, DeepSeek-V3)"),
    "moe_router_load_balancing_type": Refused(
        "Sinkhorn routing", lambda c: c.moe_router_load_balancing_type != "sinkhorn"
    ),  # the other types are auxiliary losses
    "moe_router_topk_limited_devices": Refused("device-limited routing (deprecated group routing)"),
    "moe_router_force_load_balancing": Refused("random routing (a benchmarking mode)"),
    "moe_apply_probs_on_input": Refused("routing probabilities applied to the experts' input"),
    "moe_latent_size": Refused("latent MoE (experts in a projected space)"),
    "moe_router_dtype": PRECISION,
    "moe_router_bias_update_rate": TRAINING,
    "moe_enable_routing_replay": TRAINING,
    "moe_aux_loss_coeff": TRAINING,
    "moe_z_loss_coeff": TRAINING,
    "moe_input_jitter_eps": TRAINING,  # multiplicative noise, a regularizer like dropout
    "moe_token_dropping": TRAINING,  # token dropping at a capacity: a training-time load limit
    "moe_expert_capacity_factor": TRAINING,
    "moe_pad_expert_input_to_capacity": TRAINING,
    "moe_token_drop_policy": TRAINING,
    "moe_router_padding_for_quantization": KERNEL,
    "moe_router_padding_for_fp8": KERNEL,
    "moe_shared_expert_overlap": KERNEL,
    "moe_grouped_gemm": KERNEL,
    "moe_use_legacy_grouped_gemm": KERNEL,
    "moe_token_dispatcher_type": PARALLEL,
    "moe_enable_deepep": PARALLEL,
    "moe_flex_dispatcher_backend": PARALLEL,
    "moe_deepep_num_sms": PARALLEL,
    "moe_hybridep_num_sms": PARALLEL,
    "moe_per_layer_logging": LOGGING,
    "moe_layer_recompute": MEMORY,
    "moe_permute_fusion": KERNEL,
    "moe_router_fusion": KERNEL,
    # --- other architectures no family maps
    "is_hybrid_model": Refused("a hybrid (Mamba) model"),
    "mamba_state_dim": Refused("Mamba layers"),
    "mamba_head_dim": Refused("Mamba layers"),
    "mamba_num_groups": Refused("Mamba layers"),
    "mamba_num_heads": Refused("Mamba layers"),
    "use_mamba_mem_eff_path": KERNEL,
    "heterogeneous_block_specs": Refused("layers of different shapes (heterogeneous blocks)"),
    "hetereogenous_dist_checkpoint": Refused("a heterogeneous checkpoint format"),
    # --- training, precision, kernels, memory
    "mtp_loss_scaling_factor": TRAINING,
    "hidden_dropout": TRAINING,
    "attention_dropout": TRAINING,
    "calculate_per_token_loss": TRAINING,
    "test_mode": LOGGING,
    "fp32_residual_connection": PRECISION,
    "disable_bf16_reduced_precision_matmul": PRECISION,
    "init_method": INIT,
    "output_layer_init_method": INIT,
    "init_method_std": INIT,
    "embedding_init_method": INIT,
    "embedding_init_method_std": INIT,
    "init_model_with_meta_device": INIT,
    "perform_initialization": INIT,
    "use_cpu_initialization": INIT,
    "bias_activation_fusion": KERNEL,
    "masked_softmax_fusion": KERNEL,
    "persist_layer_norm": KERNEL,
    "memory_efficient_layer_norm": KERNEL,
    "bias_dropout_fusion": KERNEL,
    "apply_rope_fusion": KERNEL,
    "fused_single_qkv_rope": KERNEL,
    "recompute_granularity": MEMORY,
    "recompute_method": MEMORY,
    "recompute_num_layers": MEMORY,
    "distribute_saved_activations": MEMORY,
    "recompute_modules": MEMORY,
    "fine_grained_activation_offloading": MEMORY,
    "offload_modules": MEMORY,
    "min_offloaded_tensor_size": MEMORY,
    "enable_cuda_graph": MEMORY,
    "cuda_graph_use_single_mempool": MEMORY,
    "cuda_graph_retain_backward_graph": MEMORY,
    "cuda_graph_warmup_steps": MEMORY,
    "external_cuda_graph": MEMORY,
    "cuda_graph_impl": MEMORY,
    "cuda_graph_scope": MEMORY,
    "fp8": PRECISION,
    "fp8_recipe": PRECISION,
    "fp8_param": PRECISION,
    "fp8_quantizer_factory": PRECISION,
    "fp8_margin": PRECISION,
    "fp8_interval": PRECISION,
    "fp8_amax_history_len": PRECISION,
    "fp8_amax_compute_algo": PRECISION,
    "fp8_wgrad": PRECISION,
    "fp8_dot_product_attention": PRECISION,
    "fp8_multi_head_attention": PRECISION,
    "tp_only_amax_red": PRECISION,
    "first_last_layers_bf16": PRECISION,
    "num_layers_at_start_in_bf16": PRECISION,
    "num_layers_at_end_in_bf16": PRECISION,
    "fp4": PRECISION,
    "fp4_recipe": PRECISION,
    "fp4_param": PRECISION,
    "fp4_quantizer_factory": PRECISION,
    "quant_recipe": PRECISION,
    "use_kitchen": PRECISION,
    "use_kitchen_attention": PRECISION,
    "kitchen_attention_backend": KERNEL,
    "batch_invariant_mode": KERNEL,
    "clone_scatter_output_in_embedding": KERNEL,
    "disable_parameter_transpose_cache": KERNEL,
    "transformer_impl": KERNEL,
    "mlp_chunks_for_prefill": KERNEL,
    "inference_rng_tracker": KERNEL,
    "inference_sampling_seed": KERNEL,
    "symmetric_ar_type": PARALLEL,
    "use_inference_optimized_layers": KERNEL,
    "inference_fuse_tp_communication": PARALLEL,
    "config_logger_dir": LOGGING,
    # --- pipeline layout
    "num_layers_in_first_pipeline_stage": PARALLEL,
    "num_layers_in_last_pipeline_stage": PARALLEL,
    "pipeline_model_parallel_layout": PARALLEL,
    "account_for_embedding_in_pipeline_split": PARALLEL,
    "account_for_loss_in_pipeline_split": PARALLEL,
    "cp_comm_type": PARALLEL,
    # --- ModelParallelConfig
    "params_dtype": Expressed("dtype"),
    "fp16": PRECISION,
    "bf16": PRECISION,
    "autocast_dtype": PRECISION,
    "enable_autocast": PRECISION,
    "pipeline_dtype": PRECISION,
    "deterministic_mode": KERNEL,
    "gradient_accumulation_fusion": TRAINING,
    "cross_entropy_loss_fusion": TRAINING,
    "cross_entropy_fusion_impl": TRAINING,
    "grad_scale_func": TRAINING,
    "finalize_model_grads_func": TRAINING,
    "no_sync_func": TRAINING,
    "grad_sync_func": TRAINING,
    "param_sync_func": TRAINING,
    "defer_embedding_wgrad_compute": TRAINING,
    "wgrad_deferral_limit": TRAINING,
    "delay_wgrad_compute": TRAINING,
    "timers": LOGGING,
    "barrier_with_L1_time": LOGGING,
    "cpu_offloading": MEMORY,
    "cpu_offloading_num_layers": MEMORY,
    "cpu_offloading_activations": MEMORY,
    "cpu_offloading_weights": MEMORY,
    "cpu_offloading_double_buffering": MEMORY,
    "_cpu_offloading_context": MEMORY,
    "num_microbatches_with_partial_activation_checkpoints": MEMORY,
    "deallocate_pipeline_outputs": MEMORY,
    **{
        name: PARALLEL
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "context_parallel_size",
            "hierarchical_context_parallel_sizes",
            "hybrid_context_parallel",
            "max_seqlen_per_dp_cp_rank",
            "expert_model_parallel_size",
            "expert_tensor_parallel_size",
            "moe_extended_tp",
            "sequence_parallel",
            "mtp_standalone",
            "microbatch_group_size_per_vp_stage",
            "pipeline_model_parallel_comm_backend",
            "variable_seq_lengths",
            "overlap_p2p_comm",
            "overlap_p2p_comm_warmup_flush",
            "batch_p2p_comm",
            "batch_p2p_sync",
            "use_ring_exchange_p2p",
            "overlap_moe_expert_parallel_comm",
            "ep_overlap_early_attn_memory_release",
            "async_tensor_model_parallel_allreduce",
            "use_te_rng_tracker",
            "tp_comm_overlap",
            "tp_comm_bulk_wgrad",
            "tp_comm_bulk_dgrad",
            "tp_comm_overlap_ag",
            "tp_comm_overlap_rs",
            "tp_comm_overlap_rs_dgrad",
            "tp_comm_split_ag",
            "tp_comm_atomic_ag",
            "tp_comm_split_rs",
            "tp_comm_atomic_rs",
            "tp_comm_bootstrap_backend",
            "tp_comm_overlap_disable_qkv",
            "tp_comm_overlap_disable_fc1",
        )
    },
}


def config_classes() -> tuple:
    """The installed megatron-core's config dataclasses whose fields FIELDS classifies."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    return ModelParallelConfig, TransformerConfig, MLATransformerConfig


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def unexpressed(config) -> list[str]:
    """What ``config`` (a TransformerConfig) sets that no family's config.json expresses: each
    Refused field not at its default (or not ``ok``), and each field FIELDS does not classify
    set to a value other than its default."""
    out = []
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), _default(field)
        kind = FIELDS.get(field.name)
        if kind is None:
            if default is dataclasses.MISSING or value != default:
                out.append(
                    f"{field.name}={value!r} (a TransformerConfig field dcp-hf does not know; "
                    f"it may change the model's math)"
                )
        elif isinstance(kind, Refused):
            ok = kind.ok(config) if kind.ok else value == default
            if not ok:
                out.append(f"{field.name}={value!r} ({kind.what})")
    return out
