"""megatron-core's distributed optimizer saved with ``save_hf(..., optimizer=)`` beside the HF
weights, its moments under HF names, and resumed in another layout bit for bit (real
megatron-core, CPU, gloo; Adam steps on gradients set by hand, as megatron-core's forward
needs CUDA).

Oracles (tests/optimizer_workers.py): the optimizer's own flat ranges, read from it on every
rank, gathered and converted to HF names by the tests' own statement of the mapping
(``naive_hf``: q/k/v per query group, each TP rank's gate/up halves); and the run that was
never stopped. The model (3 layers, hidden 40) is chosen so that the data-parallel split of the
optimizer falls inside a row of a layer's ``linear_fc1`` (in its up half)."""

from __future__ import annotations

import glob

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("megatron.core")

from dcp_hf.local_ranks import run_ranks  # noqa: E402
from dcp_hf.megatron.build import Parallel  # noqa: E402
from tests import optimizer_workers as ow  # noqa: E402
from tests.megatron_workers import Oracle  # noqa: E402

HF = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=64,
    hidden_size=40,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
    num_hidden_layers=3,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
)
STEPS = 2


def assert_same(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:6])
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, (what, bad[:6])


def flat(moments: dict) -> dict[str, torch.Tensor]:
    return {f"{state} of {key}": v for state, m in moments.items() for key, v in m.items()}


def stored_state(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in glob.glob(f"{folder}/training_state*.safetensors"):
        out.update(load_file(file))
    return out


@pytest.mark.slow
def test_distributed_optimizer_saved_under_hf_names_and_resumed_in_another_layout(tmp_path):
    root, oracle = str(tmp_path), Oracle.of(HF)
    # TP1 on 2 ranks: data-parallel 2, so each rank holds half of the optimizer state.
    run_ranks(ow.train_and_save, 2, HF, Parallel(tp=1), root, STEPS, timeout=300, daemon=False)
    saved = ow.hf_moments(f"{root}/saved", oracle)
    split = [n for n, p in torch.load(f"{root}/saved/rank1.pt").items() if p["start"] > 0]
    assert split == ["decoder.layers.1.mlp.linear_fc1.weight"], split  # the range starts inside a row

    # The files: every moment (and fp32 main param) under its HF name, each the oracle's split.
    stored = stored_state(f"{root}/hf")
    want = {f"training_state/optimizer.state.{k}.{state}": v for state, m in saved.items() for k, v in m.items()}
    assert_same({k: v for k, v in stored.items() if "/bytes/" not in k}, want, "stored optimizer state")
    assert "training_state/optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg" in stored
    assert "training_state/optimizer.state.model.layers.1.mlp.gate_proj.weight.exp_avg_sq" in stored
    assert "training_state/bytes/optimizer.param_groups.0.step" in stored

    uninterrupted = ow.hf_moments(f"{root}/uninterrupted", oracle)
    for name, world, layout in (("tp2", 2, Parallel(tp=2)), ("one", 1, Parallel())):
        steps = run_ranks(ow.resume, world, HF, layout, root, STEPS, name, timeout=300, daemon=False)
        assert steps == [[float(STEPS + 1)] * 2] * world, steps  # both param groups, one step after the save
        assert_same(flat(ow.hf_moments(f"{root}/{name}-loaded", oracle)), flat(saved), f"{name}: loaded")
        resumed = flat(ow.hf_moments(f"{root}/{name}-resumed", oracle))
        assert_same(resumed, flat(uninterrupted), f"{name}: next step")
