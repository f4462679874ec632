"""Round trips through real transformers models, built offline from small configs."""

import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter  # noqa: E402
from dcp_hf.demo import run_demo  # noqa: E402
from dcp_hf.models import LlamaShape  # noqa: E402
from tests.test_writer_hf_files import logits, tiny_llama  # noqa: E402


def test_save_pretrained_then_our_load_and_save_then_from_pretrained(tmp_path):
    source = tiny_llama(False, seed=0)
    source.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    expected = logits(source)

    model = tiny_llama(False, seed=1)  # different weights, to be overwritten by the load
    assert not torch.equal(logits(model), expected)
    state = model.state_dict()
    dcp.load(state, storage_reader=HFStorageReader(tmp_path / "hf"), planner=HFLoadPlanner(), no_dist=True)
    assert torch.equal(logits(model), expected)

    out = tmp_path / "ours"
    dcp.save(
        model.state_dict(),
        storage_writer=HFStorageWriter(out, max_shard_size="100KB"),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    shutil.copy(tmp_path / "hf" / "config.json", out / "config.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded), expected)
    theirs = sorted(f for f in os.listdir(tmp_path / "hf") if "safetensors" in f)
    ours = sorted(f for f in os.listdir(out) if f != "config.json")
    assert ours == theirs  # the same file names and index as transformers writes


@pytest.mark.slow
def test_demo_output_loads_with_from_pretrained(tmp_path):
    shape = LlamaShape(hidden=64, layers=2, intermediate=96, vocab=256, heads=4, kv_heads=2)
    run_demo(str(tmp_path), 2, shape, "100KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert torch.isfinite(logits(model).float()).all()
