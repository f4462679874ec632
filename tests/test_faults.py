"""Faults during a save: a rank that raises, dies (SIGKILL), hangs, or runs out of disk.
Every surviving rank fails with the reason within a bounded time, nothing looks committed,
and checkpoints already on disk stay readable and unchanged."""

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf.format import INDEX_NAME
from dcp_hf.local_ranks import RankFailure, run_ranks
from tests.workers import bitwise_equal, reference_state, save_cases, save_with_fault

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models


def _visible(path):
    return sorted(f for f in os.listdir(path) if not f.startswith(".")) if os.path.isdir(path) else []


def _snapshot(path):
    return {f: (path / f).read_bytes() for f in _visible(path)}


@pytest.fixture
def previous(tmp_path):
    """A committed checkpoint that a failing save with overwrite=True must leave intact."""
    path = tmp_path / "ckpt"
    run_ranks(save_cases.__globals__["save_sharded"], 2, str(path), "shard0", {"max_shard_size": 600})
    return path, _snapshot(path)


def _assert_intact(path, snapshot):
    assert _snapshot(path) == snapshot
    tensors = {}
    for f in snapshot:
        if f.endswith(".safetensors"):
            tensors.update(load_file(path / f))
    ref = reference_state()
    assert all(bitwise_equal(tensors[k], ref[k]) for k in ref)


def test_a_rank_that_raises_fails_every_rank_and_commits_nothing(tmp_path, previous):
    path, snapshot = previous
    results = run_ranks(save_with_fault, 3, str(path), "raise", 0, True)
    for status, message, _ in results:
        assert status == "error" and "injected failure while writing 'model.embed_tokens.weight'" in message
    _assert_intact(path, snapshot)
    fresh = tmp_path / "fresh"
    run_ranks(save_with_fault, 2, str(fresh), "raise", 0, False)
    assert _visible(fresh) == []  # no index, no shard: nothing that looks like a checkpoint
    # the fresh folder was never made, and nothing is left beside it (no staging folder, no lock)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_killed_rank_fails_the_survivors_quickly(previous):
    path, snapshot = previous
    with pytest.raises(RankFailure) as info:
        run_ranks(save_with_fault, 3, str(path), "kill", 0, True, timeout=120)
    assert info.value.lost == [1]
    survivors = info.value.results
    assert sorted(survivors) == [0, 2]
    for ok, value in survivors.values():
        assert ok and value[0] == "error", value
    _assert_intact(path, snapshot)


def test_a_hung_rank_fails_the_others_at_the_process_group_timeout(previous):
    path, snapshot = previous
    with pytest.raises(RankFailure) as info:
        run_ranks(save_with_fault, 2, str(path), "hang", 0, True, timeout=25, pg_timeout=5)
    assert info.value.lost == [1]  # killed by the harness after its own timeout
    ok, value = info.value.results[0]
    assert ok and value[0] == "error" and value[2] < 20, value
    _assert_intact(path, snapshot)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_fails_every_rank_and_keeps_old_checkpoints(small_disk):
    other, same = small_disk / "other", small_disk / "same"
    run_ranks(save_with_fault, 2, str(other), "none", 200_000, False)
    run_ranks(save_with_fault, 2, str(same), "none", 200_000, False)
    before_other, before_same = _snapshot(other), _snapshot(same)
    results = run_ranks(save_with_fault, 2, str(same), "none", 4_000_000, True)
    assert all(r[0] == "error" for r in results)
    assert any("No space left on device" in r[1] and "'big'" in r[1] for r in results)
    assert _snapshot(other) == before_other and _snapshot(same) == before_same
    assert INDEX_NAME not in _visible(same) or before_same.get(INDEX_NAME) == (same / INDEX_NAME).read_bytes()
    loaded = load_file(same / "model.safetensors")
    assert torch.equal(loaded["big"], torch.arange(loaded["big"].numel(), dtype=torch.float32).view(-1, 64))


def test_disk_full_while_writing_the_index_keeps_the_old_checkpoint_and_names_the_file(small_disk, monkeypatch):
    """The shards fit, then the disk fills (a real ENOSPC from the file system) just before
    the index is written: the error names the index, the old checkpoint is untouched, and
    the next save, with room again, cleans up and commits."""
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
    from dcp_hf.storage import commit

    path = small_disk / "ckpt"
    old = {f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}
    new = {k: v + 100 for k, v in old.items()}

    def save(state):
        dcp.save(
            state,
            storage_writer=HFStorageWriter(path, max_shard_size=20_000, overwrite=True),
            planner=HFSavePlanner(),
            no_dist=True,
        )

    def load():
        out = {k: torch.zeros_like(v) for k, v in old.items()}
        dcp.load(out, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(), no_dist=True)
        return out

    save(old)
    before = _snapshot(path)
    filler = small_disk / "filler"
    real = commit.write_new_file

    def fill_then_write(folder, name, data):
        if name == INDEX_NAME:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
        return real(folder, name, data)

    monkeypatch.setattr(commit, "write_new_file", fill_then_write)
    with pytest.raises(CheckpointException, match=f"No space left on device.*{INDEX_NAME}|{INDEX_NAME}.*No space left"):
        save(new)
    monkeypatch.setattr(commit, "write_new_file", real)
    assert _snapshot(path) == before
    assert all(torch.equal(load()[k], old[k]) for k in old)
    filler.unlink()
    save(new)
    assert all(torch.equal(load()[k], new[k]) for k in new)
    assert sorted(os.listdir(small_disk)) == ["ckpt"]
