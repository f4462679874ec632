"""Megatron-core models (real megatron-core, CPU, gloo) <-> HF checkpoints through DCP."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dcp_hf.local_ranks import RankFailure, run_ranks
from tests import megatron_workers as mw
from tests.cli_driver import run_cli

pytest.importorskip("megatron.core")
tf = pytest.importorskip("transformers")

from dcp_hf.megatron.build import Parallel  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
)


def tiny(family: str, **extra):
    torch.manual_seed(7)
    extra = {**COMMON, **extra}
    if family == "qwen3":
        cfg = tf.Qwen3Config(num_hidden_layers=4, head_dim=8, **extra)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(num_hidden_layers=2, **extra)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, **extra)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **{
                "num_hidden_layers": 4,
                "head_dim": 8,
                "moe_intermediate_size": 16,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "mlp_only_layers": [0],
                **extra,
            }
        )
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            num_hidden_layers=3,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            **{"num_nextn_predict_layers": 0, **extra, "num_key_value_heads": 4},
        )
    model = getattr(tf, type(cfg).__name__.replace("Config", "ForCausalLM"))(cfg).eval()
    with torch.no_grad():  # transformers initializes norms to ones and the expert bias to zeros
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b))
    return model


def read_hf(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: tensors differ: {bad}"


def logits(model) -> torch.Tensor:
    ids = torch.arange(24).view(2, 12) % 64
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_runs(tmp_path, family, layouts, *, experts="sequential", pad_vocab_to=None, oracle=True, dtype=None, **extra):
    model = tiny(family, **extra)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    out = tmp_path / "out"
    run_ranks(mw.run_layouts, 4, src, str(out), layouts, experts, pad_vocab_to, dtype, timeout=600)
    source = read_hf(src)
    hf = json.loads((tmp_path / "src" / "config.json").read_text())
    for i, p in enumerate(layouts):
        # HF -> Megatron at this layout -> HF: bit-exact, and transformers loads the export (its
        # config.json generated from the TransformerConfig) with the source model's logits.
        assert_same(read_hf(out / f"rt{i}"), source, f"round trip at {p}")
        loaded, info = tf.AutoModelForCausalLM.from_pretrained(out / f"rt{i}", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.equal(logits(loaded.eval()), logits(model)), f"logits at {p}"
        rand = read_hf(out / f"rand{i}")
        if oracle:  # a random model's export equals the naive gather-and-convert of its parameters
            want = mw.oracle_hf(out / f"dump{i}", mw.Oracle.of(hf))
            if dtype is not None:  # the export's dtype; DeepSeek's expert bias stays fp32
                want = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in want.items()}
            assert_same(rand, want, f"export at {p} vs the naive gather")
        if i:  # saved at the previous layout, loaded at this one, saved again: the same bytes
            assert_same(read_hf(out / f"cross{i}"), read_hf(out / f"rand{i - 1}"), f"{layouts[i - 1]} -> {p}")
    return out


def test_dense_qwen3_layouts(tmp_path):
    # TP4 with 2 query groups: a TP rank holds half a group's [q q | k | v] rows.
    check_runs(
        tmp_path,
        "qwen3",
        [
            Parallel(tp=2, pp=2),
            Parallel(pp=2, vpp=2),
            Parallel(pp=4),
            Parallel(tp=2, pp=2, first=1, last=3),
            Parallel(tp=4),
        ],
        pad_vocab_to=72,
    )


def test_moe_qwen3_layouts(tmp_path):
    check_runs(
        tmp_path,
        "qwen3_moe",
        [
            Parallel(tp=2, ep=2, etp=1),
            Parallel(ep=4),
            Parallel(tp=2, pp=2, ep=2, etp=1),
            Parallel(pp=2, ep=2),
        ],
    )


def test_moe_legacy_grouped_experts(tmp_path):
    """GroupedMLP keeps all local experts in one transposed tensor; Megatron's factory copies
    them out per expert and its merge puts them back after a load. (Not with PP: megatron-core
    0.16's GroupedMLP names the experts of a layer whose local and global numbers differ all
    alike; ``test_duplicate_sharded_keys_fail_clearly`` covers what dcp-hf does then.)"""
    check_runs(
        tmp_path,
        "qwen3_moe",
        [Parallel(tp=2, ep=2, etp=1), Parallel(ep=4), Parallel(ep=2)],
        experts="legacy_grouped",
        oracle=False,
    )


def test_deepseek_v3_mla_layouts(tmp_path):
    out = check_runs(
        tmp_path,
        "deepseek_v3",
        [Parallel(tp=2, ep=2), Parallel(pp=2, ep=2, etp=1, first=1, last=2)],
        dtype=torch.bfloat16,
        q_lora_rank=8,
    )
    exported = read_hf(out / "rand0")  # bf16 export, expert bias kept fp32
    assert exported["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert exported["model.layers.1.self_attn.q_b_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in exported


def test_qwen2_bias_and_llama_tied(tmp_path):
    check_runs(tmp_path / "qwen2", "qwen2", [Parallel(tp=2, pp=2), Parallel(tp=2)])
    out = check_runs(
        tmp_path / "llama", "llama", [Parallel(tp=2, pp=2), Parallel(pp=2)], tie_word_embeddings=True, pad_vocab_to=80
    )
    assert "lm_head.weight" not in read_hf(out / "rt0")


def test_duplicate_sharded_keys_fail_clearly(tmp_path):
    """megatron-core 0.16's GroupedMLP under PP gives all experts of a later stage's layer one
    key: every rank fails with that key named (not a hang, not a checkpoint missing experts)."""
    src = tmp_path / "src"
    tiny("qwen3_moe").save_pretrained(src)
    with pytest.raises(RankFailure) as info:
        run_ranks(
            mw.save_at,
            4,
            str(src),
            str(tmp_path / "out"),
            Parallel(ep=2, pp=2),
            "legacy_grouped",
            timeout=300,
            pg_timeout=120,
        )
    assert not info.value.lost
    for rank, (ok, tb) in info.value.results.items():
        assert not ok and "two different shards under one key" in tb, (rank, tb[-600:])
        assert "decoder.layers.2.mlp.experts.experts.linear_fc1.weight" in tb
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_model_for_checkpoint_fails_on_every_rank(tmp_path):
    src = tmp_path / "src"
    tiny("qwen3").save_pretrained(src)
    other = tmp_path / "other"
    tiny("qwen3", intermediate_size=64).save_pretrained(other)  # a model with another FFN size
    # its config.json does not describe the model: refused before reading
    with pytest.raises(RankFailure) as info:
        run_ranks(mw.load_into, 2, str(other), str(src), Parallel(tp=2), timeout=300, pg_timeout=120)
    for rank, (ok, tb) in info.value.results.items():
        assert not ok and str(src) in tb and "intermediate_size: 48 given, 64 in the model" in tb, tb[-600:]
    # without a config.json: the tensors' shapes
    (src / "config.json").unlink()
    with pytest.raises(RankFailure) as info:
        run_ranks(mw.load_into, 2, str(other), str(src), Parallel(tp=2), timeout=300, pg_timeout=120)
    for rank, (ok, tb) in info.value.results.items():
        assert not ok and str(src) in tb and "has shape [48, 32] in the checkpoint but [64, 32]" in tb, tb[-600:]


@pytest.mark.parametrize(
    "family, extra, stacked",
    [
        ("qwen3_moe", {"mlp_only_layers": []}, "decoder.layers.mlp.experts.experts.linear_fc1.weight"),
        ("deepseek_v3", {"q_lora_rank": 8}, None),  # a dense first layer: one key per layer
    ],
)
def test_export_torch_dist_offline(tmp_path, family, extra, stacked):
    """A torch_dist checkpoint written by megatron-core (vocab padded; layers and experts
    stacked on leading axes where all layers are alike) -> HF, without building the model: in
    this process and under 2 ranks."""
    src = tmp_path / "src"
    model = tiny(family, **extra)
    model.save_pretrained(src)
    layout = Parallel(tp=2, pp=2, ep=2, etp=1) if family == "qwen3_moe" else Parallel(tp=2, ep=2)
    run_ranks(mw.save_torch_dist, 4, str(src), str(tmp_path / "mcore"), layout, timeout=600, daemon=False)
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(tmp_path / "mcore")).read_metadata().state_dict_metadata
    assert stacked is None or len(stored[stacked].size) == 4  # [L, E, 2F, H]
    done = run_cli("export", "--from", "megatron", "--quiet", tmp_path / "mcore", tmp_path / "hf1", "--config", src)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped: " in done.stdout  # the _extra_state objects
    assert_same(read_hf(tmp_path / "hf1"), read_hf(src), "export in one process")
    run_ranks(mw.export_offline, 2, str(tmp_path / "mcore"), str(tmp_path / "hf2"), str(src))
    assert_same(read_hf(tmp_path / "hf2"), read_hf(src), "export on 2 ranks")
    hf = json.loads((src / "config.json").read_text())  # the oracle, of the parameters the model loaded
    assert_same(read_hf(tmp_path / "hf2"), mw.oracle_hf(tmp_path / "mcore-params", mw.Oracle.of(hf)), "vs the oracle")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert torch.equal(logits(loaded), logits(model))
