"""Megatron <-> HF for every family beyond Llama/Qwen2/Qwen3/Qwen3-MoE/DeepSeek-V3 (those are in
test_megatron.py), at one process and at a parallel layout, against the oracle of
testkit/megatron_oracle.py (an independent per-parameter statement of the mapping); what a
config.json cannot express, or a config that does not describe the model, is refused before
anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from dcp_hf.local_ranks import run_ranks
from tests import megatron_workers as mw
from tests.cli_driver import run_cli
from tests.test_megatron import COMMON, assert_same, logits, read_hf

pytest.importorskip("megatron.core")
tf = pytest.importorskip("transformers")

from dcp_hf.megatron.build import Parallel  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models

MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, rope_parameters=LLAMA3_ROPE, **COMMON),  # Llama-3.1 RoPE
    "mistral": lambda: tf.MistralConfig(num_hidden_layers=2, head_dim=8, sliding_window=None, **COMMON),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        num_hidden_layers=2, num_experts=4, shared_expert_intermediate_size=24, norm_topk_prob=False, **MOE, **COMMON
    ),
    "mixtral": lambda: tf.MixtralConfig(
        num_hidden_layers=2,
        num_local_experts=4,
        head_dim=8,
        **{**COMMON, "intermediate_size": 16},
        num_experts_per_tok=2,
    ),
    "glm4_moe": lambda: tf.Glm4MoeConfig(
        num_hidden_layers=3,
        head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        attention_bias=True,
        use_qk_norm=True,
        routed_scaling_factor=2.0,
        num_nextn_predict_layers=1,
        **MOE,
        **COMMON,
    ),
    "deepseek_v2": lambda: tf.DeepseekV2Config(
        num_hidden_layers=3,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        routed_scaling_factor=1.5,
        **MOE,
        **{**COMMON, **MLA},
    ),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        num_hidden_layers=3,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=8,
        n_group=1,
        topk_group=1,
        num_nextn_predict_layers=1,
        **MOE,
        **{**COMMON, **MLA},
    ),
}
MTP = ("glm4_moe", "deepseek_v3")  # built with their multi-token-prediction layer


def tiny_model(family: str, config=None):
    """A tiny transformers model of ``family`` (of ``config``, default ``CONFIGS``') with every
    weight random (norms, biases, expert bias too: transformers initializes those to
    constants, which would hide a swap)."""
    torch.manual_seed(11)
    cfg = config if config is not None else CONFIGS[family]()
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b))
    return model


def add_mtp_layers(folder, hf: dict) -> None:
    """An HF MTP layer (transformers does not model it): the last decoder layer's tensors with
    new random values, enorm/hnorm/eh_proj/shared_head.norm, and copies of the embedding and
    head, as DeepSeek-V3 and GLM-4.5 checkpoints hold them."""
    state = read_hf(folder)
    layers, hidden = hf["num_hidden_layers"], hf["hidden_size"]
    last, base = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    g = torch.Generator().manual_seed(5)
    for k, v in list(state.items()):
        if k.startswith(last):
            state[base + k[len(last) :]] = torch.randn(v.shape, generator=g, dtype=v.dtype)
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        state[base + name] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state[base + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
    state[base + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[base + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    for file in folder.glob("*.safetensors"):
        file.unlink()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )


def prepare(tmp_path, family, config=None):
    model = tiny_model(family, config)
    src = tmp_path / family / "src"
    model.save_pretrained(src)
    hf = json.loads((src / "config.json").read_text())
    if family in MTP:
        add_mtp_layers(src, hf)
    return model, src, hf


def parallel_layouts(family):
    if family in ("llama", "mistral"):
        return [Parallel(tp=2, pp=2)]
    if family == "glm4_moe":  # MTP on the last of 2 stages, experts over 2 ranks
        return [Parallel(tp=2, pp=2, ep=2, etp=1, first=1, last=2)]
    return [Parallel(tp=2, ep=2)]


def check_family(tmp_path, family, model, src, hf, world, layouts):
    out = tmp_path / family / f"out{world}"
    mtp = family in MTP
    source = read_hf(src)
    mtp_layer = f"model.layers.{hf['num_hidden_layers']}."  # transformers does not model MTP layers
    oracle = mw.Oracle.of(hf, mtp=1 if mtp else 0)
    for i, p in enumerate(layouts):
        where = f"{family} at {p} on {world} process(es)"
        # HF -> Megatron -> HF, bit-exact (also the MTP layer transformers does not model); a
        # mistake mirrored in both directions (k/v or gate/up swapped) passes this ...
        assert_same(read_hf(out / f"rt{i}"), source, f"round trip, {where}")
        # ... but not this: a random Megatron model's export equals the oracle's conversion
        want = mw.oracle_hf(out / f"dump{i}", oracle)
        assert_same(read_hf(out / f"rand{i}"), want, f"export vs the oracle, {where}")
        for folder in (out / f"rand{i}", out / f"rt{i}"):
            loaded, info = tf.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
            assert type(loaded).__name__ == hf["architectures"][0], where
            assert not info["missing_keys"] and not info["mismatched_keys"], (where, info)
            assert all(k.startswith(mtp_layer) for k in info["unexpected_keys"]), (where, info["unexpected_keys"])
            assert bool(info["unexpected_keys"]) == mtp, (where, info["unexpected_keys"])
        assert torch.equal(logits(loaded.eval()), logits(model)), f"logits, {where}"
        if i:
            assert_same(read_hf(out / f"cross{i}"), read_hf(out / f"rand{i - 1}"), f"cross, {where}")
    # config.json generated from the model: the family's class, RoPE exactly (Llama-3 scaling read
    # back from Megatron's frequencies, GLM-4.5's partial rotary)
    exported = json.loads((out / "rand0" / "config.json").read_text())
    assert exported["architectures"] == hf["architectures"], exported["architectures"]
    assert exported["rope_parameters"] == hf["rope_parameters"], exported["rope_parameters"]


def test_families_export_import(tmp_path):
    """Every family at one process, then at a parallel layout (TP2/EP2, or TP2/PP2 with EP2 and
    MTP on the last stage, on 4 processes); one set of processes runs all families."""
    prepared = {family: prepare(tmp_path, family) for family in CONFIGS}
    for world in (1, 4):
        jobs = [
            (
                str(src),
                str(tmp_path / family / f"out{world}"),
                [Parallel()] if world == 1 else parallel_layouts(family),
                family in MTP,
            )
            for family, (model, src, hf) in prepared.items()
        ]
        run_ranks(mw.run_families, world, jobs, timeout=900)
        for family, (model, src, hf) in prepared.items():
            check_family(tmp_path, family, model, src, hf, world, jobs[list(prepared).index(family)][2])


def test_refused_before_writing(tmp_path):
    """What config.json cannot express, a config that does not describe the model, or an
    export transformers would not load as written: an error on every rank, nothing written."""
    llama = tf.LlamaConfig(num_hidden_layers=2, **COMMON).to_dict()
    qwen3 = tf.Qwen3Config(num_hidden_layers=2, head_dim=8, **COMMON).to_dict()
    partial = {
        **llama,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }
    glm = CONFIGS["glm4_moe"]().to_dict()
    cases = [
        ("other_family", qwen3, dict(config=llama)),
        ("disagrees", qwen3, dict(config={**qwen3, "intermediate_size": 64})),
        ("partial_llama", partial, dict(family="llama")),
        ("partial_inferred", partial, {}),
        ("dtype", qwen3, dict(config={**qwen3, "dtype": "bfloat16"})),
        ("vocab", qwen3, dict(config=qwen3, vocab_size=60)),
        ("unknown", qwen3, dict(family="qwen4")),
        ("family_vs_config", qwen3, dict(config=qwen3, family="llama")),
        ("mtp_config", glm, dict(config={**glm, "num_nextn_predict_layers": 2})),
        ("bf16_ok", qwen3, dict(config={**qwen3, "dtype": "bfloat16"}, dtype=torch.bfloat16)),
    ]
    results = run_ranks(mw.try_saves, 2, str(tmp_path), cases, timeout=600)
    assert results[0] == results[1]  # every rank, the same error
    expect = {
        "other_family": "the llama HF config cannot express: qk_layernorm=True",  # the config names the family
        "disagrees": "intermediate_size: 64 given, 48 in the model",
        "partial_llama": "rotary_percent=0.5",
        "partial_inferred": "no HF family expresses this Megatron config",
        "dtype": "of another dtype",
        "vocab": "model.embed_tokens.weight: [60, 32] written, [64, 32] expected",
        "unknown": "unknown family 'qwen4'",
        "family_vs_config": "family='llama' but the HF config says model_type 'qwen3'",
        "mtp_config": "num_nextn_predict_layers: 2 given, 0 in the model",
        "bf16_ok": None,
    }
    for name, want in expect.items():
        error, written = results[0][name]
        if want is None:
            assert error is None and written, (name, error)
        else:
            assert error is not None and want in error, (name, error)
            assert not written, name


def test_export_torch_dist_offline_families(tmp_path):
    """``dcp-hf export --from megatron`` of torch_dist checkpoints (layers and experts stacked
    where all layers are alike): Mixtral (block_sparse_moe, w1/w3/w2) and GLM-4.5 with its MTP
    layer; the family is the config's; a config of another family is refused before writing."""
    prepared = {family: prepare(tmp_path, family) for family in ("mixtral", "glm4_moe")}
    layouts = {"mixtral": Parallel(tp=2, ep=2), "glm4_moe": Parallel(tp=2, pp=2, ep=2, etp=1, first=1, last=2)}
    jobs = [
        (str(src), str(tmp_path / family / "mcore"), layouts[family], family in MTP)
        for family, (model, src, hf) in prepared.items()
    ]
    run_ranks(mw.save_torch_dists, 4, jobs, timeout=600, daemon=False)
    from dcp_hf.megatron.export import export_torch_dist

    export_torch_dist(
        str(tmp_path / "mixtral" / "mcore"), str(tmp_path / "mixtral" / "hf"), str(prepared["mixtral"][1])
    )
    done = run_cli(
        "export",
        "--from",
        "megatron",
        "--quiet",
        tmp_path / "glm4_moe" / "mcore",
        tmp_path / "glm4_moe" / "hf",
        "--config",
        prepared["glm4_moe"][1],
        "--family",
        "glm4_moe",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for family, (model, src, hf) in prepared.items():
        exported = read_hf(tmp_path / family / "hf")
        assert_same(exported, read_hf(src), f"offline export of {family}")
        oracle = mw.Oracle.of(hf, mtp=1 if family in MTP else 0)  # of the parameters the model loaded
        assert_same(exported, mw.oracle_hf(tmp_path / family / "mcore-params", oracle), f"{family} vs the oracle")
    stored = FileSystemReader(str(tmp_path / "mixtral" / "mcore")).read_metadata().state_dict_metadata
    assert len(stored["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == 4  # [L, E, 2F, H]
    other = json.loads((tmp_path / "mixtral" / "src" / "config.json").read_text())
    wrong = {
        **other,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": 4,
        "moe_intermediate_size": other["intermediate_size"],
    }
    with pytest.raises(ValueError, match="nothing written") as info:
        export_torch_dist(str(tmp_path / "mixtral" / "mcore"), str(tmp_path / "bad"), wrong)
    # Qwen3-MoE's qk norm: the checkpoint's training arguments say the Mixtral had none
    assert "common.pt: the training arguments" in str(info.value), str(info.value)[:2000]
    assert "qk_layernorm=False" in str(info.value), str(info.value)[:2000]
    assert not (tmp_path / "bad").exists()
