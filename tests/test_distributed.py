"""Multi-process DCP save/load (gloo, CPU) for every placement, resharding, and failures."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dcp_hf.local_ranks import run_ranks
from tests.workers import bitwise_equal, load_cases, reference_state, save_cases, without_save_id

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    errors = run_ranks(save_cases, 2, root)
    return root, errors


def _read_all(path):
    files = sorted(os.listdir(path))
    out = {}
    for f in files:
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return files, out


@pytest.mark.parametrize("kind", ["shard0", "shard1", "mixed", "replicate", "async"])
def test_saved_checkpoint_is_exactly_the_reference(saved, kind):
    root, _ = saved
    files, tensors = _read_all(f"{root}/{kind}")
    ref = reference_state()
    assert set(tensors) == set(ref)
    for k, v in ref.items():
        assert bitwise_equal(tensors[k], v), k
    # Exactly an HF checkpoint: numbered shards + index, nothing else (no temporary files).
    n = len(files) - 1
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + [
        "model.safetensors.index.json"
    ]
    with open(f"{root}/{kind}/model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())


def test_same_files_whatever_the_sharding(saved):
    """The file layout depends on the tensors only, so every layout writes identical bytes (but
    for each save's own id)."""
    root, _ = saved

    def contents(kind):
        return {f: without_save_id(open(f"{root}/{kind}/{f}", "rb").read()) for f in os.listdir(f"{root}/{kind}")}

    first = contents("shard0")
    for kind in ("shard1", "mixed", "replicate", "async"):
        assert contents(kind) == first, kind


def test_two_chunks_of_one_tensor_on_each_rank(saved):
    root, _ = saved
    files, tensors = _read_all(f"{root}/sharded_tensor")
    assert files == ["model.safetensors"]
    assert torch.equal(tensors["st"], torch.arange(48, dtype=torch.float32).view(8, 6))
    assert torch.equal(tensors["x"], torch.ones(3))


def test_errors_reach_every_rank_and_touch_nothing(saved):
    _, errors = saved
    for rank_errors in errors:
        assert "'step' is not a tensor" in rank_errors["non_tensor"]
        assert "'w': ranks disagree on the tensor" in rank_errors["inconsistent"]
        assert rank_errors["non_tensor_files"] == [] and rank_errors["inconsistent_files"] == []


def test_load_resharded_on_three_ranks(saved):
    root, _ = saved
    results = run_ranks(load_cases, 3, root)
    assert results == [{}, {}, {}]
