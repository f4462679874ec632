"""Nothing is written outside the checkpoint folder: links planted at the names a save uses
(index temporaries, partial files, the staging folder) are never written through, and a rank
never writes through a file swapped in after the coordinator created it."""

import os
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import DcpHfError
from dcp_hf.storage import commit, writer

STATE = {f"layers.{i}.w": torch.full((8, 8), float(i)) for i in range(4)}
SHARDED = 600


def save(path, overwrite=True):
    dcp.save(
        STATE,
        storage_writer=HFStorageWriter(path, max_shard_size=SHARDED, overwrite=overwrite),
        planner=HFSavePlanner(),
        no_dist=True,
    )


def loads_whole(path) -> bool:
    out = {k: torch.zeros_like(v) for k, v in STATE.items()}
    dcp.load(out, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(), no_dist=True)
    return all(torch.equal(out[k], STATE[k]) for k in STATE)


@pytest.fixture
def outside(tmp_path):
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("not yours")
    return victim


def test_links_at_the_index_temporary_names_are_not_written_through(tmp_path, outside):
    path = tmp_path / "ckpt"
    save(path, overwrite=False)
    for pid in range(os.getpid() - 50, os.getpid() + 2000):  # the names the index used to get
        os.symlink(outside, path / f"model.safetensors.index.json.tmp-{pid}")
    save(path)
    assert outside.read_text() == "not yours"
    assert not os.path.islink(path / "model.safetensors.index.json")
    assert loads_whole(path)


@pytest.mark.parametrize("where", ["partial", "staging", "index"])
def test_links_at_a_known_save_id_are_not_written_through(tmp_path, outside, monkeypatch, where):
    """Even knowing the save id (here forced), a planted link is refused or ignored."""
    path = tmp_path / "ckpt"
    save(path, overwrite=False)
    save_id = "0123456789ab"
    monkeypatch.setattr(writer.uuid, "uuid4", lambda: uuid.UUID(save_id + "0" * 20))
    if where == "partial":  # in the folder and in the staging folder it would use
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            os.symlink(outside, path / f".{name}.{save_id}.partial")
    elif where == "staging":
        os.symlink(outside.parent, tmp_path / f".ckpt.dcp-hf-new-{save_id}")
    else:
        os.symlink(outside, path / f".model.safetensors.index.json.{save_id}.tmp")
    try:
        save(path)
    except CheckpointException as e:
        ((error, _),) = e.failures.values()
        assert isinstance(error, DcpHfError) and str(tmp_path) in str(error), repr(error)
    assert outside.read_text() == "not yours" and os.listdir(outside.parent) == ["victim.txt"]
    assert loads_whole(path)


def test_a_file_swapped_after_creation_is_not_written_through(tmp_path, outside):
    created = tmp_path / "f.partial"
    fd, ident = commit.create_file(str(created))
    os.close(fd)
    os.rename(created, tmp_path / "moved")  # kept, so its inode number is not reused
    os.symlink(outside, created)  # as another rank would find it, opening it by name
    with pytest.raises(OSError):  # O_NOFOLLOW: the link itself is refused
        commit.open_created(str(created), ident)
    os.unlink(created)
    created.write_text("another file at the name")
    with pytest.raises(DcpHfError, match=f"{created}: not the file this save created"):
        commit.open_created(str(created), ident)
    assert outside.read_text() == "not yours"
    with pytest.raises(FileExistsError):  # and creation never reuses an existing name
        commit.create_file(str(created))
