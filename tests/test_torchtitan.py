"""torchtitan 0.3.0's own CheckpointManager (installed from PyPI), unchanged, with dcp-hf's
switch (``dcp_hf.torchtitan.use_dcp_hf``): its initial HF load and its last-step HF save, with
the base checkpoint's index (torchtitan saves into ``step-N/sharded`` and then calls torch's
consolidation) and without. The oracles are independent of dcp-hf: the base weights as
transformers wrote them (safetensors' own reader) and the saved folder loaded by
transformers' ``from_pretrained``, compared with the trained weights torchtitan's model held."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("torchtitan.components.checkpoint", reason="torchtitan==0.3.0 (see pyproject's torchtitan extra)")
from transformers import LlamaForCausalLM  # noqa: E402

from dcp_hf.local_ranks import run_ranks  # noqa: E402
from tests.torchtitan_workers import tiny_llama, titan_load_train_save  # noqa: E402

pytestmark = pytest.mark.slow


def _base(tmp_path, sharded: bool) -> str:
    folder = str(tmp_path / "base")
    tiny_llama(seed=1).save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
    return folder


def _base_weights(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize("sharded", [True, False], ids=["base-index", "no-index"])
def test_torchtitan_hf_load_and_save(tmp_path, sharded):
    base = _base(tmp_path, sharded)
    results = run_ranks(titan_load_train_save, 2, str(tmp_path / "run"), base, True, timeout=240)
    loaded, saved, had_index = results[0]
    loaded = {k: torch.from_numpy(v) for k, v in loaded.items()}
    saved = {k: torch.from_numpy(v) for k, v in saved.items()}
    assert had_index == sharded
    expected = _base_weights(base)
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    step = tmp_path / "run" / "checkpoint" / "step-1"
    names = sorted(os.listdir(step))
    assert "sharded" not in names and not [n for n in names if n.startswith(".")], names
    if sharded:  # the base's key -> file map, kept
        with open(os.path.join(base, "model.safetensors.index.json")) as f:
            base_map = json.load(f)["weight_map"]
        with open(step / "model.safetensors.index.json") as f:
            assert json.load(f)["weight_map"] == base_map
    else:
        assert names == ["model.safetensors"]
    (step / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    reloaded = LlamaForCausalLM.from_pretrained(str(step)).state_dict()
    assert set(reloaded) == set(saved)
    changed = 0
    for key, value in saved.items():
        assert torch.equal(reloaded[key], value), key
        changed += not torch.equal(value, expected[key])
    assert changed == len(saved)  # the step trained every weight: the save is not the base
