"""Single-process save/load through DCP: format fidelity, dtypes, options and errors."""

import json
import os
import struct

import pytest
import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.format import INDEX_NAME
from dcp_hf.models import pattern_tensor
from tests.workers import bitwise_equal, reference_state


def save(sd, path, **kw):
    dcp.save(sd, storage_writer=HFStorageWriter(path, **kw), planner=HFSavePlanner(), no_dist=True)


def load(sd, path, planner=None, **kw):
    reader = HFStorageReader(path, **kw)
    dcp.load(sd, storage_reader=reader, planner=planner or HFLoadPlanner(), no_dist=True)
    return reader


ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
]


def dtype_state():
    out = {f"t.{str(dt).removeprefix('torch.')}": pattern_tensor(str(dt), (3, 5), dt) for dt in ALL_DTYPES}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 4)
    return out


def test_every_dtype_round_trips_and_reads_with_safetensors(tmp_path):
    sd = dtype_state()
    save(sd, tmp_path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    with open(tmp_path / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert (
        n % 8 == 0 and header["__metadata__"]["format"] == "pt" and len(header["__metadata__"]["dcp_hf_save_id"]) == 12
    )
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for k in f.keys():
            if "uint16" in k or "uint32" in k or "uint64" in k or "complex" in k:
                continue  # covered by our own reader below
            assert bitwise_equal(f.get_tensor(k), sd[k]), k
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    load(out, tmp_path)
    for k in sd:
        assert bitwise_equal(out[k], sd[k]), k


def test_multi_file_layout_and_index(tmp_path):
    sd = reference_state()
    save(sd, tmp_path, max_shard_size=600)
    files = sorted(os.listdir(tmp_path))
    n = len(files) - 1
    assert n > 1 and files[-1] == INDEX_NAME
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == files[:-1]
    on_disk = {}
    for f in files[:-1]:
        on_disk.update(load_file(tmp_path / f))
    assert set(on_disk) == set(sd) and all(bitwise_equal(on_disk[k], sd[k]) for k in sd)


def test_loads_checkpoints_written_by_safetensors_and_huggingface_hub(tmp_path):
    sd = {k: v for k, v in reference_state().items() if v.dtype != torch.float8_e4m3fn}
    save_file(sd, tmp_path / "model.safetensors")
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    load(out, tmp_path)
    assert all(bitwise_equal(out[k], sd[k]) for k in sd)

    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    save_torch_state_dict(sd, hub_dir, max_shard_size=500)
    assert (hub_dir / INDEX_NAME).exists()
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    load(out, hub_dir)
    assert all(bitwise_equal(out[k], sd[k]) for k in sd)


def _read_box(path, key, dest, storage_offsets, **reader_kw):
    """Read one box of a stored tensor into ``dest`` the way DCP does for a local chunk."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    reader = HFStorageReader(path, **reader_kw)
    md = reader.read_metadata()
    planner = DefaultLoadPlanner()
    planner.set_up_planner({key: dest}, md)
    item = ReadItem(
        LoadItemType.TENSOR,
        MetadataIndex(key),
        torch.Size([0] * dest.dim()),
        MetadataIndex(key, [0] * dest.dim()),
        torch.Size(storage_offsets),
        dest.shape,
    )
    reader.read_data(LoadPlan([item]), planner).wait()
    return reader


def test_partial_reads_read_only_the_needed_bytes(tmp_path):
    w = torch.arange(64 * 32, dtype=torch.float32).view(64, 32)
    save({"w": w}, tmp_path)
    dest = torch.zeros(32, 32)
    reader = _read_box(tmp_path, "w", dest, [16, 0])
    assert reader.bytes_read == 32 * 32 * 4 and torch.equal(dest, w[16:48])
    # Column boxes are strided runs, copied out of a mapping: the touched span is counted.
    cols = torch.zeros(64, 16)
    reader = _read_box(tmp_path, "w", cols, [0, 8])
    assert torch.equal(cols, w[:, 8:24]) and reader.bytes_read == 63 * 128 + 64
    narrow = torch.zeros(64, 2)
    reader = _read_box(tmp_path, "w", narrow, [0, 30])
    assert torch.equal(narrow, w[:, 30:])


def test_export_dtype_casts_floats_only(tmp_path):
    sd = {"w": torch.randn(4, 4), "i": torch.arange(3), "h": torch.randn(2).half()}
    save(sd, tmp_path, dtype=torch.bfloat16)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert on_disk["w"].dtype == torch.bfloat16 and torch.equal(on_disk["w"], sd["w"].bfloat16())
    assert on_disk["h"].dtype == torch.bfloat16
    assert torch.equal(on_disk["i"], sd["i"])


def test_dtype_mismatch_is_an_error_unless_cast_is_allowed(tmp_path):
    save({"w": torch.randn(4, 4, dtype=torch.bfloat16)}, tmp_path)
    out = {"w": torch.zeros(4, 4)}
    with pytest.raises(CheckpointException, match=r"'w' is torch.bfloat16 in the checkpoint but torch.float32"):
        load(out, tmp_path)
    assert torch.count_nonzero(out["w"]) == 0
    load(out, tmp_path, allow_dtype_cast=True)
    assert torch.equal(out["w"], load_file(tmp_path / "model.safetensors")["w"].float())


def test_missing_key_and_shape_mismatch_name_the_key(tmp_path):
    save({"w": torch.randn(4, 4)}, tmp_path)
    with pytest.raises(CheckpointException, match=r"missing 1 key\(s\).*'absent'"):
        load({"w": torch.zeros(4, 4), "absent": torch.zeros(1)}, tmp_path)
    out = {"w": torch.zeros(4, 4), "absent": torch.zeros(1)}
    load(out, tmp_path, planner=HFLoadPlanner(allow_missing=["absent"]))
    assert torch.count_nonzero(out["w"]) > 0
    with pytest.raises(CheckpointException, match=r"'w' has shape \[4, 4\] in the checkpoint but \[4, 5\]"):
        load({"w": torch.zeros(4, 5)}, tmp_path)


def test_non_tensor_value_fails_before_any_file_is_written(tmp_path):
    with pytest.raises(CheckpointException, match="'step' is not a tensor"):
        save({"w": torch.ones(2), "step": 3}, tmp_path / "out")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_overwrite_is_refused_by_default_and_cleans_stale_files(tmp_path):
    save(reference_state(), tmp_path, max_shard_size=600)
    with pytest.raises(CheckpointException, match="already holds a checkpoint.*overwrite=True"):
        save({"w": torch.ones(2)}, tmp_path)
    save({"w": torch.ones(2)}, tmp_path, overwrite=True)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    out = {"w": torch.zeros(2)}
    load(out, tmp_path)
    assert torch.equal(out["w"], torch.ones(2))


def test_index_that_disagrees_with_a_header_is_an_error(tmp_path):
    save(reference_state(), tmp_path, max_shard_size=600)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    key = "model.scale"
    other = next(f for k, f in index["weight_map"].items() if f != index["weight_map"][key])
    index["weight_map"][key] = other
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointException, match=f"{other}: .*model.scale"):
        load({key: torch.zeros(())}, tmp_path)


def test_index_naming_a_missing_file_is_an_error(tmp_path):
    save(reference_state(), tmp_path, max_shard_size=600)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    victim = index["weight_map"]["model.scale"]
    os.unlink(tmp_path / victim)
    with pytest.raises(CheckpointException, match=f"{victim}: named by model.safetensors.index.json but missing"):
        load({"model.scale": torch.zeros(())}, tmp_path)


def test_files_outside_the_index_are_never_read(tmp_path):
    sd = reference_state()
    save(sd, tmp_path, max_shard_size=600)
    save_file({"model.scale": torch.tensor(99.0)}, tmp_path / "stale.safetensors")
    out = {"model.scale": torch.zeros(())}
    load(out, tmp_path, planner=HFLoadPlanner(allow_unexpected=True))
    assert out["model.scale"] == sd["model.scale"]


def test_truncated_file_is_reported_with_its_name(tmp_path):
    save({"w": torch.randn(64, 64)}, tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointException, match="model.safetensors: data region ends at byte"):
        load({"w": torch.zeros(64, 64)}, tmp_path)


def test_progress_bar_is_opt_in(tmp_path, capsys):
    save({"w": torch.randn(8, 8)}, tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    save({"w": torch.randn(8, 8)}, tmp_path / "loud", progress=True)
    assert "dcp-hf save" in capsys.readouterr().err


def test_unexpected_checkpoint_keys_are_an_error_unless_allowed(tmp_path):
    save(reference_state(), tmp_path)
    out = {"model.scale": torch.zeros(())}
    with pytest.raises(
        CheckpointException,
        match=r"8 tensor\(s\) of the checkpoint are loaded by no rank: "
        r"'model.embed_tokens.weight', 'model.fp8'",
    ):
        load(out, tmp_path)
    assert out["model.scale"] == 0
    with pytest.raises(CheckpointException, match="loaded by no rank: 'model.fp8'"):
        load(out, tmp_path, planner=HFLoadPlanner(allow_unexpected=["model.layers.*", "model.embed*"]))
    load(out, tmp_path, planner=HFLoadPlanner(allow_unexpected=["model.layers.*", "model.embed*", "model.fp8"]))
    assert out["model.scale"] == reference_state()["model.scale"]


def test_non_tensor_values_are_an_error_unless_allowed_missing(tmp_path):
    save({"w": torch.ones(2)}, tmp_path)
    out = {"w": torch.zeros(2), "step": 5}
    with pytest.raises(CheckpointException, match="'step' is a int, not a tensor"):
        load(out, tmp_path)
    load(out, tmp_path, planner=HFLoadPlanner(allow_missing=["step"]))
    assert out["step"] == 5 and torch.equal(out["w"], torch.ones(2))


def test_dcp_default_planners_work_too(tmp_path):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    sd = reference_state()
    dcp.save(sd, storage_writer=HFStorageWriter(tmp_path), no_dist=True)
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(out, storage_reader=HFStorageReader(tmp_path), planner=DefaultLoadPlanner(), no_dist=True)
    assert all(bitwise_equal(out[k], sd[k]) for k in sd)


def test_inspect_escapes_names_that_would_drive_the_terminal(tmp_path):
    from dcp_hf.inspect import inspect_checkpoint

    name = "evil\x1b]0;owned\x07\x1b[2J\nname\u202e"
    dcp.save(
        {name: torch.ones(2), "fine.name": torch.ones(3)},
        storage_writer=HFStorageWriter(tmp_path),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    out = inspect_checkpoint(str(tmp_path), verbose=True)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "  evil\\x1b]0;owned\\x07\\x1b[2J\\nname\\u202e  F32  [2]" in out
    assert "  fine.name  F32  [3]" in out
