"""A training checkpoint in HF form (dcp_hf.training_state): a tiny transformers Llama under
FSDP2 with AdamW and an LR schedule on 2 gloo ranks saves its whole training state in one
``dcp.save``; a new job (the first one's process group is gone) resumes from it and trains on,
bit for bit as the uninterrupted run (parameters, optimizer state, losses: the oracle is the
run that was never stopped); the same checkpoint loads into 3 ranks, FSDP2 + TP on a 2-D mesh of 4 and into one process equal
to the state that was saved (gathered in the saving job); the model half is a plain HF
checkpoint for transformers."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from transformers import LlamaForCausalLM

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import root_cause
from dcp_hf.local_ranks import run_ranks
from tests.training_workers import load_2d, load_resharded, resume_train, train_save_continue

K, N = 3, 6


def assert_same(got: dict, want: dict, what: str):
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for key in want:
        assert np.array_equal(got[key], want[key]), (what, key)


@pytest.mark.slow
@pytest.mark.parametrize("use_async", [False, True], ids=["save", "async_save"])
def test_resume_is_bit_exact_and_reshards(tmp_path, use_async):
    path = str(tmp_path / "ckpt")
    first = run_ranks(train_save_continue, 2, path, K, N, use_async, timeout=240)
    names = sorted(os.listdir(path))
    assert "model.safetensors.index.json" in names and "training_state.safetensors.index.json" in names, names
    assert not [n for n in names if n.startswith(".")], names

    resumed = run_ranks(resume_train, 2, path, K, N, timeout=240)
    for rank in range(2):
        assert resumed[rank]["losses"] == first[rank]["losses"][K:], rank
        assert_same(resumed[rank]["final"], first[rank]["final"], f"rank {rank} after resuming")
    saved = first[0]["saved"]
    assert any(".exp_avg_sq" in k for k in saved) and any(k.endswith(".step") for k in saved)

    if use_async:
        return  # the resharded loads read the same files either way
    for world in (3, 1):
        loaded = run_ranks(load_resharded, world, path, timeout=240)
        for rank, got in enumerate(loaded):
            assert_same(got["loaded"], saved, f"{world} ranks, rank {rank}")
            assert got["objects"] == first[0]["saved_objects"], (world, rank)

    for rank, got in enumerate(run_ranks(load_2d, 4, path, timeout=240)):  # FSDP2 + TP, 2-D mesh
        assert got["two_d"] > 0
        assert_same(got["loaded"], saved, f"2-D mesh, rank {rank}")
        assert got["objects"] == first[0]["saved_objects"], rank

    # The model half is the HF checkpoint, and the moments are found by the model's HF names.
    model = LlamaForCausalLM.from_pretrained(path)
    for key, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), saved[f"model.{key}"]), key
    with open(os.path.join(path, "training_state.safetensors.index.json")) as f:
        state_map = json.load(f)["weight_map"]
    q = "training_state/optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg"
    with safe_open(os.path.join(path, state_map[q]), "pt") as f:
        assert np.array_equal(
            f.get_tensor(q).numpy(), saved["optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg"]
        )


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "model.embed.weight": torch.randn(6, 4, generator=g),
            "lm_head.weight": torch.randn(3, 4, generator=g),
        },
        "optimizer": {
            "state": {"model.embed.weight": {"exp_avg": torch.randn(6, 4, generator=g), "step": torch.tensor(2.0)}},
            "param_groups": [{"lr": 0.5, "betas": (0.9, 0.95), "params": ["model.embed.weight"]}],
        },
        "train_state": {"step": seed},
    }


def _zeros(state):
    if isinstance(state, dict):
        return {k: _zeros(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_zeros(v) for v in state)
    return torch.zeros_like(state) if isinstance(state, torch.Tensor) else None


def test_one_process_round_trip_model_only_loads_and_a_plain_checkpoint(tmp_path):
    path, plain = str(tmp_path / "ckpt"), str(tmp_path / "plain")
    state = _state(5)
    dcp.save(state, storage_writer=HFStorageWriter(path), planner=HFSavePlanner(model_prefix="model."), no_dist=True)
    target = _zeros(state)
    dcp.load(target, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(model_prefix="model."), no_dist=True)
    assert target["train_state"] == {"step": 5}
    assert target["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for a, b in [
        (target["model"], state["model"]),
        (target["optimizer"]["state"]["model.embed.weight"], state["optimizer"]["state"]["model.embed.weight"]),
    ]:
        for key in b:
            assert torch.equal(a[key], b[key]), key
    # A model-only load (HF names, no prefix) ignores the training state.
    model_only = {"model.embed.weight": torch.zeros(6, 4), "lm_head.weight": torch.zeros(3, 4)}
    dcp.load(model_only, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(), no_dist=True)
    assert torch.equal(model_only["lm_head.weight"], state["model"]["lm_head.weight"])
    # Asking a plain HF checkpoint for training state names what is missing.
    dcp.save(state["model"], storage_writer=HFStorageWriter(plain), planner=HFSavePlanner(), no_dist=True)
    with pytest.raises(BaseException) as info:
        dcp.load(
            _zeros(state),
            storage_reader=HFStorageReader(plain),
            planner=HFLoadPlanner(model_prefix="model."),
            no_dist=True,
        )
    message = str(root_cause(info.value))
    assert "holds no training state" in message and "training_state/bytes/train_state.step" in message, message
    # ... or leaves it as it is with allow_missing.
    target = _zeros(state)
    planner = HFLoadPlanner(model_prefix="model.", allow_missing=["optimizer.*", "train_state.*"])
    dcp.load(target, storage_reader=HFStorageReader(plain), planner=planner, no_dist=True)
    assert torch.equal(target["model"]["lm_head.weight"], state["model"]["lm_head.weight"])
    # A model-only save over the training checkpoint leaves no training state of the old one.
    dcp.save(
        state["model"], storage_writer=HFStorageWriter(path, overwrite=True), planner=HFSavePlanner(), no_dist=True
    )
    assert not [n for n in os.listdir(path) if n.startswith("training_state")], os.listdir(path)


def test_optimizer_state_follows_the_layout(tmp_path):
    """A parameter's optimizer state (``optimizer.state.<param>.<name>``) is stored as the
    parameter is: through the layout's renames and splits. The oracle is transformers' fused
    experts form, restated: ``gate_up_proj[e]`` is [gate_e; up_e] rows, ``down_proj[e]`` down_e."""
    from dcp_hf import Layout, MergedExperts, Prefix

    g = torch.Generator().manual_seed(3)
    e, f, h = 2, 3, 4
    params = {"layers.0.mlp.experts.gate_up_proj": (e, 2 * f, h), "layers.0.mlp.experts.down_proj": (e, h, f)}
    params["norm.weight"] = (h,)
    state = {
        "model": {k: torch.randn(s, generator=g) for k, s in params.items()},
        "optimizer": {
            "state": {
                k: {"exp_avg": torch.randn(s, generator=g), "step": torch.tensor(4.0)} for k, s in params.items()
            },
            "param_groups": [{"lr": 0.1, "params": sorted(params)}],
        },
    }
    layout = Layout((MergedExperts("transformers"),), renames=(Prefix("", "thinker."),))
    path = str(tmp_path / "ckpt")
    dcp.save(
        state, storage_writer=HFStorageWriter(path), planner=HFSavePlanner(layout, model_prefix="model."), no_dist=True
    )
    stored = {}
    for name in os.listdir(path):
        if name.startswith("training_state") and name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as sf:
                stored.update({k: sf.get_tensor(k) for k in sf.keys() if "/bytes/" not in k})
    moments = state["optimizer"]["state"]
    fused, down = (
        moments["layers.0.mlp.experts.gate_up_proj"]["exp_avg"],
        moments["layers.0.mlp.experts.down_proj"]["exp_avg"],
    )
    want = {"training_state/optimizer.state.thinker.norm.weight.exp_avg": moments["norm.weight"]["exp_avg"]}
    for x in range(e):
        base = f"training_state/optimizer.state.thinker.layers.0.mlp.experts.{x}."
        want[base + "gate_proj.weight.exp_avg"] = fused[x, :f]
        want[base + "up_proj.weight.exp_avg"] = fused[x, f:]
        want[base + "down_proj.weight.exp_avg"] = down[x]
    for key in params:  # a 0-dim state takes the renames only
        want[f"training_state/optimizer.state.thinker.{key}.step"] = torch.tensor(4.0)
    assert sorted(stored) == sorted(want), sorted(set(stored) ^ set(want))
    for key, value in want.items():
        assert torch.equal(stored[key], value), key
    target = _zeros(state)
    dcp.load(
        target, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(layout, model_prefix="model."), no_dist=True
    )
    for key in params:
        for name in ("exp_avg", "step"):
            assert torch.equal(target["optimizer"]["state"][key][name], moments[key][name]), (key, name)
        assert torch.equal(target["model"][key], state["model"][key]), key
