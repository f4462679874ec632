"""Tiny MoE models built offline from transformers configs, and the reference expert math."""

from __future__ import annotations

import torch


def tiny_moe(model_type: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
    )
    if model_type == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if model_type == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=16, num_local_experts=4)
        return tf.MixtralForCausalLM(cfg).eval()
    if model_type == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        )
        return tf.DeepseekV3ForCausalLM(cfg).eval()
    if model_type == "qwen3_omni_moe_thinker":
        text = dict(common, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8)
        cfg = tf.Qwen3OmniMoeThinkerConfig(
            text_config=text,
            audio_config=dict(
                d_model=32,
                encoder_layers=1,
                encoder_attention_heads=2,
                encoder_ffn_dim=32,
                num_mel_bins=16,
                output_dim=32,
                n_window=4,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
        )
        return tf.Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    raise ValueError(model_type)


def logits(model) -> torch.Tensor:
    ids = torch.arange(24).view(2, 12) % 64
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_merge(gate: list, up: list, down: list, style: str):
    """The merged tensors of one layer, straight from the definitions (the test oracle)."""
    if style == "transformers":
        return (torch.stack([torch.cat([g, u], 0) for g, u in zip(gate, up)]), torch.stack(down))
    gate_up = torch.stack([torch.cat([g, u], 0).T for g, u in zip(gate, up)])  # [E, H, 2F]
    down_t = torch.stack([d.T for d in down])  # [E, F, H]
    if style == "mindspeed":
        return gate_up, down_t
    return gate_up.reshape(-1, gate_up.shape[-1]), down_t.reshape(-1, down_t.shape[-1])
