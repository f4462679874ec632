"""Local destinations that cannot take a save as they are: a folder at a shard's name, a
read-only folder (as an unprivileged user), a full file system at the first writes. Each is a
clear error naming the path; nothing is left that the next save trips on."""

import multiprocessing
import os
import pathlib
import shutil
import stat
import tempfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import DcpHfError
from tests.test_faults import small_disk  # noqa: F401 - the fixture: a small tmpfs

SHARDED = 1200  # max_shard_size: three files


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(8, 16, generator=g) for i in range(6)}


def save(path, sd, overwrite=True):
    dcp.save(
        sd,
        storage_writer=HFStorageWriter(path, max_shard_size=SHARDED, overwrite=overwrite),
        planner=HFSavePlanner(),
        no_dist=True,
    )


def loads_as(path, seed) -> bool:
    out = {k: torch.zeros_like(v) for k, v in state(0).items()}
    dcp.load(out, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(), no_dist=True)
    return all(torch.equal(out[k], v) for k, v in state(seed).items())


def dcp_hf_error(info) -> DcpHfError:
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, DcpHfError), repr(error)
    return error


def hidden_leftovers(path) -> list[str]:
    inside = [n for n in os.listdir(path) if n.startswith(".")] if os.path.isdir(path) else []
    beside = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(f".{os.path.basename(path)}.")]
    return inside + beside


def test_a_folder_at_a_shard_name_is_refused_naming_it(tmp_path):
    path = tmp_path / "ckpt"
    save(path, state(1))
    shard = path / "model-00002-of-00003.safetensors"
    os.unlink(path / "model-00003-of-00003.safetensors")
    os.mkdir(path / "model-00003-of-00003.safetensors")
    (path / "model-00003-of-00003.safetensors" / "mine.txt").write_text("the user's")
    with pytest.raises(CheckpointException) as info:
        save(path, state(2))
    assert f"{path}/model-00003-of-00003.safetensors: is a folder where the checkpoint has a file" in str(
        dcp_hf_error(info)
    )
    assert (path / "model-00003-of-00003.safetensors" / "mine.txt").read_text() == "the user's"
    assert shard.is_file() and hidden_leftovers(str(path)) == []
    os.rename(path / "model-00003-of-00003.safetensors", tmp_path / "moved")
    save(path, state(2))  # moved away as told: the next save works
    assert loads_as(path, 2)


def _as_nobody(path, conn):
    """In a forked child (modules already imported: the interpreter itself is not readable by
    an unprivileged user here), as uid/gid 65534 without capabilities."""
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        save(path, state(2))
        conn.send("saved")
    except BaseException as e:  # noqa: BLE001 - sent to the test
        failures = getattr(e, "failures", None)
        conn.send(repr(next(iter(failures.values()))[0]) if failures else repr(e))


@pytest.fixture
def shared_tmp():
    """A folder every user can reach (pytest's tmp_path is under a root-only folder)."""
    folder = tempfile.mkdtemp(prefix="dcp-hf-ro-")
    os.chmod(folder, 0o777)
    yield pathlib.Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_read_only_folder_is_refused_and_left_as_it_was(shared_tmp):
    if os.getuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    path = shared_tmp / "ckpt"
    save(path, state(1))
    save(path, state(3))  # warm: every module a save imports is loaded before the fork
    os.chown(path, 65534, 65534)
    for name in os.listdir(path):
        os.chown(path / name, 65534, 65534)
    os.chmod(path, 0o555)
    before = sorted(os.listdir(path))
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_as_nobody, args=(str(path), theirs))
    child.start()
    child.join(120)
    got = mine.recv() if mine.poll(1) else f"no answer (exit code {child.exitcode})"
    assert f"{path}: cannot save into it (Permission denied); make it writable" in got, got
    assert sorted(os.listdir(path)) == before and hidden_leftovers(str(path)) == []
    assert loads_as(path, 3)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o555


# -- a full file system ------------------------------------------------------------------------
def _fill(mnt, leave: int) -> None:
    """Fill the file system but ``leave`` bytes (in whole pages)."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_at_the_first_writes_names_the_path_and_the_next_save_works(small_disk):  # noqa: F811
    """The save's first writes (its lock, its staging folder and marker, its files, its index)
    hit ENOSPC at every free-space level from none to enough: each save either commits or
    fails with an error naming a path under the destination, the old checkpoint loading;
    once there is room the next save commits, with nothing left beside or in the folder."""
    path, failed = small_disk / "ckpt", 0
    for leave in range(0, 40 << 10, 2048):
        save(path, state(1))
        _fill(small_disk, leave)
        try:
            save(path, state(2))
            assert loads_as(path, 2), leave
        except CheckpointException as e:
            ((error, _),) = e.failures.values()
            assert isinstance(error, DcpHfError), (leave, repr(error))
            assert "No space left on device" in str(error) and str(small_disk) in str(error), (leave, error)
            assert loads_as(path, 1), leave
            failed += 1
        os.unlink(small_disk / "filler")
        save(path, state(3))
        assert loads_as(path, 3) and hidden_leftovers(str(path)) == [], leave
    assert failed >= 5, failed
