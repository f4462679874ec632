"""Every TransformerConfig setting that changes a Megatron model's math is expressed in the
config.json save_hf writes, or refused before anything is written (and load_hf refuses a
checkpoint into such a model). The oracle of "expressed" is Megatron's own forward on CPU
against transformers' forward of the export."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import pytest
import torch

from dcp_hf.local_ranks import run_ranks
from tests import megatron_workers as mw
from tests.test_megatron import COMMON

pytest.importorskip("megatron.core")
tf = pytest.importorskip("transformers")

from dcp_hf.megatron.config_fields import FIELDS, Expressed, NotMath, Refused, config_classes  # noqa: E402


def test_every_config_field_is_classified():
    """A field of the installed megatron-core's configs that FIELDS does not classify (a new
    megatron-core) fails here; at run time it is refused when set to a non-default value."""
    fields = {f.name for cls in config_classes() for f in dataclasses.fields(cls)}
    assert not fields - set(FIELDS), f"unclassified: {sorted(fields - set(FIELDS))}"
    assert not set(FIELDS) - fields, f"classified but not in megatron-core: {sorted(set(FIELDS) - fields)}"
    assert all(isinstance(v, (Expressed, Refused, NotMath)) for v in FIELDS.values())


def test_unknown_field_is_refused():
    from dcp_hf.megatron.config_fields import unexpressed
    from dcp_hf.megatron.hf_config import megatron_config

    config, _ = megatron_config(tf.LlamaConfig(num_hidden_layers=2, **COMMON).to_dict())
    assert unexpressed(config) == []
    saved = FIELDS.pop("window_size")
    try:
        config.window_size = (4, 0)
        assert "window_size=(4, 0) (a TransformerConfig field dcp-hf does not know" in unexpressed(config)[0]
        config.window_size = None
        assert unexpressed(config) == []
    finally:
        FIELDS["window_size"] = saved


def _base_models(tmp_path) -> dict[str, str]:
    torch.manual_seed(5)
    configs = {
        "llama": tf.LlamaConfig(num_hidden_layers=2, **COMMON),
        "qwen2": tf.Qwen2Config(num_hidden_layers=2, **COMMON),
        "qwen3": tf.Qwen3Config(num_hidden_layers=2, head_dim=8, **COMMON),
        "qwen3_moe": tf.Qwen3MoeConfig(
            num_hidden_layers=2,
            head_dim=8,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            **COMMON,
        ),
    }
    out = {}
    for name, cfg in configs.items():
        folder = tmp_path / "base" / name
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        shutil.copytree(folder, f"{folder}-bare", ignore=shutil.ignore_patterns("config.json"))
        out[name] = str(folder)
    return out


SAME = None  # expected: written, and transformers' logits of the export equal Megatron's
# (name, base family, TransformerConfig overrides, GPTModel overrides, set on the built config, expected)
CASES = [
    # expressed, non-default: the export computes what Megatron computes
    ("defaults", "llama", {}, {}, {}, SAME),
    ("head_dim_16", "llama", {"kv_channels": 16}, {}, {}, SAME),
    ("one_group", "llama", {"num_query_groups": 1}, {}, {}, SAME),
    ("eps_theta", "llama", {"layernorm_epsilon": 1e-3}, {"rotary_base": 500000}, {}, SAME),
    ("llama3_rope", "llama", {}, {"rotary_base": 500000, "rope_scaling": True, "rope_scaling_factor": 16.0}, {}, SAME),
    ("tied", "llama", {}, {"share_embeddings_and_output_weights": True}, {}, SAME),
    ("softmax_scale_default", "llama", {"softmax_scale": 1 / math.sqrt(8)}, {}, {}, SAME),
    ("no_rope_none", "llama", {"no_rope_freq": [0, 0]}, {}, {}, SAME),
    ("qkv_bias", "qwen2", {}, {}, {}, SAME),
    ("qk_norm", "qwen3", {}, {}, {}, SAME),
    ("qkv_bias_inferred", "llama", {"add_qkv_bias": True}, {}, {}, SAME),  # the one family: Qwen2
    ("qk_norm_inferred", "llama", {"qk_layernorm": True}, {}, {}, SAME),  # Qwen3
    ("moe", "qwen3_moe", {}, {}, {}, SAME),
    ("moe_pre_softmax", "qwen3_moe", {"moe_router_pre_softmax": True}, {}, {}, SAME),
    # not math (NotMath): the same function
    ("layer_scaling", "llama", {"apply_query_key_layer_scaling": True}, {}, {}, SAME),
    ("dropout_eval", "llama", {"hidden_dropout": 0.5, "attention_dropout": 0.5}, {}, {}, SAME),
    ("fp32_residual", "llama", {"fp32_residual_connection": True}, {}, {}, SAME),
    # math no family expresses: refused, nothing written
    ("softmax_scale", "llama", {"softmax_scale": 0.5}, {}, {}, "softmax_scale=0.5"),
    ("off_by_one", "llama", {"softmax_type": "off-by-one"}, {}, {}, "softmax_type='off-by-one'"),
    ("sinks", "llama", {"softmax_type": "learnable"}, {}, {}, "softmax_type='learnable'"),
    ("glu_offset", "llama", {"glu_linear_offset": 1.0}, {}, {}, "glu_linear_offset=1.0"),
    ("glu_clamp", "llama", {"activation_func_clamp_value": 7.0}, {}, {}, "activation_func_clamp_value=7.0"),
    ("nope_layers", "llama", {"no_rope_freq": 2}, {}, {}, "no_rope_freq=[0, 1]"),
    ("qk_l2_norm", "llama", {"qk_l2_norm": True}, {}, {}, "qk_l2_norm=True"),
    ("zero_centered", "llama", {}, {}, {"layernorm_zero_centered_gamma": True}, "layernorm_zero_centered_gamma"),
    ("post_ln", "llama", {"apply_residual_connection_post_layernorm": True}, {}, {}, "apply_residual_connection"),
    ("linear_bias", "llama", {"add_bias_linear": True}, {}, {}, "add_bias_linear=True"),
    ("interleaved", "llama", {"rotary_interleaved": True}, {}, {}, "rotary_interleaved=True"),
    ("window", "llama", {}, {}, {"window_size": (4, 0)}, "window_size=(4, 0)"),
    ("window_skip", "llama", {}, {}, {"window_attn_skip_freq": 2}, "window_attn_skip_freq=2"),
    ("output_gate", "llama", {}, {}, {"attention_output_gate": True}, "attention_output_gate=True"),
    ("delta_net", "llama", {}, {}, {"experimental_attention_variant": "gated_delta_net"}, "gated_delta_net"),
    ("linear_attention", "llama", {}, {}, {"linear_attention_freq": 2}, "linear_attention_freq=2"),
    ("dsa", "llama", {}, {}, {"dsa_indexer_topk": 4}, "dsa_indexer_topk=4"),
    ("mrope", "llama", {}, {}, {"mrope_section": [2, 1, 1]}, "mrope_section=[2, 1, 1]"),
    ("hybrid", "llama", {}, {}, {"is_hybrid_model": True}, "is_hybrid_model=True"),
    ("heterogeneous", "llama", {}, {}, {"heterogeneous_block_specs": True}, "heterogeneous_block_specs=True"),
    ("gelu", "llama", {"activation_func": torch.nn.functional.gelu}, {}, {}, "an MLP other than SwiGLU"),
    ("layernorm", "llama", {"normalization": "LayerNorm"}, {}, {}, "normalization='LayerNorm'"),
    ("partial_rotary", "llama", {}, {"rotary_percent": 0.5}, {}, "rotary_percent=0.5"),
    ("linear_rope", "llama", {}, {"seq_len_interpolation_factor": 2.0}, {}, "seq_len_interpolation_factor=2.0"),
    ("learned_positions", "llama", {}, {"position_embedding_type": "none"}, {}, "position_embedding_type='none'"),
    ("sinkhorn", "qwen3_moe", {"moe_router_load_balancing_type": "sinkhorn"}, {}, {}, "Sinkhorn"),
    ("random_routing", "qwen3_moe", {"moe_router_force_load_balancing": True}, {}, {}, "force_load_balancing"),
    ("probs_on_input", "qwen3_moe", {}, {}, {"moe_apply_probs_on_input": True}, "moe_apply_probs_on_input"),
    ("latent_moe", "qwen3_moe", {}, {}, {"moe_latent_size": 8}, "moe_latent_size=8"),
    ("limited_devices", "qwen3_moe", {}, {}, {"moe_router_topk_limited_devices": 2}, "topk_limited_devices=2"),
]


@pytest.mark.slow
def test_math_settings_exported_exactly_or_refused(tmp_path):
    bases = _base_models(tmp_path)
    cases = [(name, bases[base], over, gpt, after) for name, base, over, gpt, after, _ in CASES]
    results = run_ranks(mw.trust_cases, 1, str(tmp_path / "out"), cases, timeout=900)[0]
    ids = torch.arange(24).view(2, 12) % 64
    unbuilt = {name: r for name, r in results.items() if isinstance(r, str)}
    assert not unbuilt, unbuilt
    for name, base, *_, want in CASES:
        error, written, given, loaded, given_written, bare = results[name]
        if want is SAME:
            assert error is None and written, (name, error)
            model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name).eval()
            with torch.no_grad():
                theirs = model(input_ids=ids).logits
            ours = torch.load(tmp_path / "out" / f"{name}.megatron.pt")
            assert torch.allclose(theirs, ours, atol=2e-5, rtol=0), (name, (theirs - ours).abs().max())
        else:
            for what, message, wrote in (("save_hf", error, written), ("save_hf(config=)", given, given_written)):
                assert message is not None and want in message, (name, what, message)
                assert not wrote, (name, what)
            for what, message in (("load_hf", loaded), ("load_hf without config.json", bare)):
                assert message is not None and want in message, (name, what, message)


# (name, TransformerConfig overrides, GPTModel overrides, set on the built config, with args, expected)
EXPORT_CASES = [
    ("match", {}, {}, {}, True, SAME),
    ("no_args", {}, {}, {}, False, "records no training arguments"),
    ("gated_gelu", {"activation_func": torch.nn.functional.gelu}, {}, {}, True, "an MLP other than SwiGLU"),
    ("window", {}, {}, {"window_size": (4, 0)}, True, "window_size=(4, 0)"),
    ("interleaved", {"rotary_interleaved": True}, {}, {}, True, "rotary_interleaved=True"),
    ("linear_rope", {}, {"seq_len_interpolation_factor": 2.0}, {}, True, "seq_len_interpolation_factor=2.0"),
    ("partial_rotary", {}, {"rotary_percent": 0.5}, {}, True, "rotary_percent=0.5"),
    ("post_ln", {"apply_residual_connection_post_layernorm": True}, {}, {}, True, "apply_residual_connection"),
    ("softmax_scale", {"softmax_scale": 0.5}, {}, {}, True, "softmax_scale=0.5"),
    ("glu_offset", {"glu_linear_offset": 1.0}, {}, {}, True, "glu_linear_offset=1.0"),
    ("glu_clamp", {"activation_func_clamp_value": 7.0}, {}, {}, True, "activation_func_clamp_value=7.0"),
    ("nope_layers", {"no_rope_freq": 2}, {}, {}, True, "no_rope_freq=[0, 1]"),
    ("theta", {}, {"rotary_base": 500000}, {}, True, "rope_parameters"),  # the config says 10000
    ("tied", {}, {"share_embeddings_and_output_weights": True}, {}, True, "tie_word_embeddings"),
]
REFUSED_FAMILIES = {  # HF configs of families dcp-hf does not map (megatron-core 0.16 lacks or dcp-hf has no mapping)
    "gemma2": lambda: tf.Gemma2Config(num_hidden_layers=2, head_dim=8, **COMMON),
    "gemma3": lambda: tf.Gemma3TextConfig(num_hidden_layers=2, head_dim=8, **COMMON),
    "llama4": lambda: tf.Llama4TextConfig(num_hidden_layers=2, head_dim=8, **COMMON),
    "phi3": lambda: tf.Phi3Config(num_hidden_layers=2, pad_token_id=0, **COMMON),  # its default pad id is past vocab 64
    "olmoe": lambda: tf.OlmoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, **COMMON),
    "gpt_oss": lambda: tf.GptOssConfig(num_hidden_layers=2, head_dim=8, num_local_experts=4, **COMMON),
    "qwen3_next": lambda: tf.Qwen3NextConfig(num_hidden_layers=4, head_dim=8, num_experts=4, **COMMON),
}


def _refused_config(name: str) -> dict:
    hf = REFUSED_FAMILIES[name]().to_dict()
    hf["architectures"] = hf.get("architectures") or [
        type(REFUSED_FAMILIES[name]()).__name__.replace("Config", "ForCausalLM")
    ]
    return hf


@pytest.mark.slow
def test_export_checks_training_arguments(tmp_path):
    """``dcp-hf export --from megatron`` of torch_dist checkpoints written by megatron-core's
    dist_checkpointing.save with Megatron-LM's ``args`` in the common state: a model whose
    arguments the config.json states exports, with transformers' logits of the export equal
    to Megatron's forward; one trained with a setting the config does not state (or no family
    expresses) is refused naming it, nothing written; without arguments, refused unless
    --assume-config-matches; configs of unmapped families refused."""
    from dcp_hf.megatron.export import export_torch_dist
    from tests.cli_driver import run_cli

    base = _base_models(tmp_path)["llama"]
    cases = [(name, base, over, gpt, after, args) for name, over, gpt, after, args, _ in EXPORT_CASES]
    run_ranks(mw.torch_dist_cases, 1, str(tmp_path / "mcore"), cases, timeout=900, daemon=False)
    ids = torch.arange(24).view(2, 12) % 64
    for name, *_, want in EXPORT_CASES:
        src, dst = tmp_path / "mcore" / name, tmp_path / "hf" / name
        if want is SAME:  # through the command line
            done = run_cli("export", "--from", "megatron", "--quiet", src, dst, "--config", base)
            assert done.returncode == 0, (name, done.stderr[-2000:])
            model = tf.AutoModelForCausalLM.from_pretrained(dst).eval()
            with torch.no_grad():
                theirs = model(input_ids=ids).logits
            ours = torch.load(tmp_path / "mcore" / f"{name}.megatron.pt")
            assert torch.allclose(theirs, ours, atol=2e-5, rtol=0), (name, (theirs - ours).abs().max())
        else:
            with pytest.raises(ValueError, match="nothing written") as info:
                export_torch_dist(str(src), str(dst), base)
            assert want in str(info.value), (name, str(info.value))
            assert not dst.exists(), name
    # without arguments: the caller vouches for the config
    dst = tmp_path / "hf" / "no_args_assumed"
    done = run_cli(
        "export", "--from", "megatron", "--quiet", tmp_path / "mcore" / "no_args", dst, "--config", base,
        "--assume-config-matches",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert tf.AutoModelForCausalLM.from_pretrained(dst) is not None
    # families dcp-hf does not map: refused before writing, whatever the checkpoint
    for family in REFUSED_FAMILIES:
        dst = tmp_path / "hf" / family
        with pytest.raises(ValueError, match="is not a family dcp-hf maps"):
            export_torch_dist(str(tmp_path / "mcore" / "match"), str(dst), _refused_config(family))
        assert not dst.exists(), family


@pytest.mark.slow
def test_unmapped_families_refused(tmp_path):
    """save_hf with the config of a family dcp-hf does not map, and load_hf of a checkpoint
    whose config.json is one: refused naming the model_type, nothing written or loaded."""
    base = _base_models(tmp_path)["llama"]
    configs = {name: _refused_config(name) for name in REFUSED_FAMILIES}
    results = run_ranks(mw.refused_families, 1, base, str(tmp_path / "out"), configs, timeout=600)[0]
    for name, (saved, written, loaded) in results.items():
        model_type = configs[name]["model_type"]
        for what, error in (("save_hf", saved), ("load_hf", loaded)):
            assert error is not None and f"model_type {model_type!r} is not a family dcp-hf maps" in error, (
                name,
                what,
                error,
            )
        assert not written, name


def _saved(folder, config) -> str:
    """A real HF checkpoint of ``config``: transformers' model class of it, random weights."""
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def _assert_import_refused(src: str, root, want: str) -> None:
    """``import_hf`` of SRC into ``root/out`` refused naming ``want``; nothing written in root
    (nor the hidden folder an import builds in) but SRC."""
    from dcp_hf.megatron.import_hf import import_hf

    before = sorted(os.listdir(root))
    with pytest.raises(ValueError, match="nothing written") as info:
        import_hf(src, os.path.join(root, "out"))
    assert want in str(info.value), str(info.value)
    assert sorted(os.listdir(root)) == before


@pytest.mark.parametrize("name", sorted(REFUSED_FAMILIES))
def test_import_refuses_unmapped_families(tmp_path, name):
    """``import_hf`` of a real checkpoint of a family dcp-hf does not map (Gemma-2/3, Llama-4,
    Phi-3, OLMoE, GPT-OSS, Qwen3-Next): refused naming its model_type, nothing written."""
    config = REFUSED_FAMILIES[name]()
    src = _saved(tmp_path / "src", config)
    _assert_import_refused(src, tmp_path, f"model_type {config.model_type!r} is not a family dcp-hf maps")


@pytest.mark.parametrize(
    "config, want",
    [
        (lambda: tf.MistralConfig(num_hidden_layers=2, head_dim=8, **COMMON), "sliding_window: 4096 given, None"),
        (lambda: tf.LlamaConfig(num_hidden_layers=2, mlp_bias=True, **COMMON), "mlp_bias: True given, False"),
        (lambda: tf.LlamaConfig(num_hidden_layers=2, attention_bias=True, **COMMON), "add_qkv_bias=True"),
        (
            lambda: tf.Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=1, **COMMON),
            "layer_types",
        ),
        (lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_act="gelu", **COMMON), "hidden_act 'gelu'"),
        (
            lambda: tf.LlamaConfig(
                num_hidden_layers=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, **COMMON
            ),
            "rope_parameters",
        ),
        (lambda: tf.Gemma2Config(num_hidden_layers=2, head_dim=8, **COMMON), "is not a family dcp-hf maps"),
    ],
)
def test_hf_config_with_math_the_megatron_model_lacks_is_refused(tmp_path, config, want):
    """The HF -> Megatron direction (export's layout, an import): an HF config whose Megatron
    model would compute something else is refused, naming the setting; ``import_hf`` of a real
    checkpoint of it writes nothing."""
    from dcp_hf.megatron.hf_config import checked_megatron_config

    with pytest.raises(ValueError) as info:
        checked_megatron_config(config().to_dict())
    assert want in str(info.value), str(info.value)
    _assert_import_refused(_saved(tmp_path / "src", config()), tmp_path, want)


def test_mistral_config_generated_without_a_window():
    from dcp_hf.megatron.hf_config import GPTSettings, checked_megatron_config, hf_config

    hf = tf.MistralConfig(num_hidden_layers=2, head_dim=8, sliding_window=None, **COMMON).to_dict()
    _, config, gpt = checked_megatron_config(hf)
    assert hf_config(GPTSettings.of_config(config, gpt), "mistral")["sliding_window"] is None
