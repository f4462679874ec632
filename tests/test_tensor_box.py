"""TensorBox with dcp-hf's planners (saved and loaded in place) and with DCP's default save
planner (a clear error naming the planner to use, before any file is written)."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter, TensorBox


def test_tensor_box_with_our_planners(tmp_path):
    full = torch.arange(12.0).view(4, 3)
    dcp.save(
        {"w": TensorBox(full[:4].clone(), (0, 0), (4, 3))},
        storage_writer=HFStorageWriter(tmp_path),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], full)  # safetensors reads it
    box = TensorBox(torch.zeros(2, 3), (2, 0), (4, 3))
    dcp.load({"w": box}, storage_reader=HFStorageReader(tmp_path), planner=HFLoadPlanner(), no_dist=True)
    assert torch.equal(box.local, full[2:])


def test_tensor_box_with_dcp_default_save_planner_is_a_clear_error(tmp_path):
    box = TensorBox(torch.ones(2, 3), (0, 0), (4, 3))
    with pytest.raises(BaseException, match="save it with planner=HFSavePlanner"):
        dcp.save({"w": box}, storage_writer=HFStorageWriter(tmp_path / "out"), no_dist=True)
    with pytest.raises(BaseException, match="save it with planner=HFSavePlanner"):
        dcp.save({"w": box}, storage_writer=dcp.FileSystemWriter(tmp_path / "dcp"), no_dist=True)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_tensor_box_with_dcp_default_load_planner_fails_in_planning(tmp_path):
    """Documented limit: DCP's default load planner drops values it does not know."""
    save_file({"w": torch.ones(4, 3)}, tmp_path / "model.safetensors")
    box = TensorBox(torch.zeros(2, 3), (2, 0), (4, 3))
    with pytest.raises(BaseException, match="BytesStorageMetadata"):
        dcp.load({"w": box}, storage_reader=HFStorageReader(tmp_path), no_dist=True)
    assert not box.local.any()
