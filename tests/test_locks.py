"""The save lock: several saves into one folder from one process (threads, or two process
groups) — exactly one holds the folder, the others fail at once with CheckpointBusyError; odd
files at the lock's name are taken over when they cannot be a live lock, else refused naming
the file and how to remove it, never followed."""

import json
import os
import random
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import CheckpointBusyError
from dcp_hf.local_ranks import run_ranks
from dcp_hf.storage import commit


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(16, 8, generator=g) for i in range(6)}


def loaded(path) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in state(0).items()}
    dcp.load(out, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(), no_dist=True)
    return out


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Waiting(HFSavePlanner):
    """Waits in ``resolve_data`` (after the lock is taken) until ``release`` is set; with
    ``jitter``, sleeps a random moment instead, to vary the interleaving."""

    def __init__(self, release=None, jitter=0.0):
        super().__init__()
        self.release, self.jitter = release, jitter

    def resolve_data(self, write_item):
        if self.release is not None:
            assert self.release.wait(60)
        elif self.jitter:
            time.sleep(random.random() * self.jitter)
        return super().resolve_data(write_item)


def save(path, sd, planner=None, **kwargs):
    dcp.save(
        sd,
        storage_writer=HFStorageWriter(path, max_shard_size=1200, overwrite=True, **kwargs),
        planner=planner or HFSavePlanner(),
        no_dist=True,
    )


def busy(error: BaseException) -> bool:
    return isinstance(error, CheckpointException) and all(
        isinstance(e, CheckpointBusyError) for e, _ in error.failures.values()
    )


def no_leftovers(path) -> bool:
    return sorted(os.listdir(path.parent)) == [path.name] and not any(n.startswith(".") for n in os.listdir(path))


def test_a_save_in_another_thread_of_the_process_is_refused_while_one_runs(tmp_path):
    path = tmp_path / "ckpt"
    release, errors = threading.Event(), []

    def first():
        try:
            save(path, state(1), Waiting(release))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(commit.lock_path(str(path))) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with pytest.raises(CheckpointException, match="another save into this folder is running") as info:
            save(path, state(2))
        assert busy(info.value)
    finally:
        release.set()
        t.join(60)
    assert errors == []
    assert same(loaded(path), state(1))
    assert no_leftovers(path)


def test_racing_threads_one_wins_at_a_time_the_others_are_busy(tmp_path):
    """Eight threads start saves into one folder at once, many times: each save succeeds or
    fails with CheckpointBusyError, and the folder holds a save that succeeded, whole."""
    path = tmp_path / "ckpt"
    for trial in range(4):
        start, results = threading.Barrier(8), {}

        def one(n):
            start.wait()
            try:
                save(path, state(10 * trial + n), Waiting(jitter=0.01))
                results[n] = None
            except BaseException as e:  # noqa: BLE001
                results[n] = e

        threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wins = [n for n, e in results.items() if e is None]
        assert len(results) == 8 and wins, results
        assert all(busy(e) for e in results.values() if e is not None), results
        final = loaded(path)
        assert any(same(final, state(10 * trial + n)) for n in wins), trial
        assert no_leftovers(path)


def _two_groups(rank, world, path):
    """Two saves into one folder on two process groups of the same ranks, from two threads
    of each rank: the second starts while the first holds the lock."""
    groups = [dist.new_group(backend="gloo"), dist.new_group(backend="gloo")]
    second_done, outcome = threading.Event(), {}

    def run(n, planner):
        try:
            dcp.save(
                state(n + 1),
                storage_writer=HFStorageWriter(path, max_shard_size=1200, overwrite=True, process_group=groups[n]),
                planner=planner,
                process_group=groups[n],
            )
            outcome[n] = "ok"
        except BaseException as e:  # noqa: BLE001
            outcome[n] = "busy" if busy(e) else repr(e)
        finally:
            if n == 1:
                second_done.set()

    first = threading.Thread(target=run, args=(0, Waiting(second_done)))
    first.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(commit.lock_path(path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    dist.barrier()  # rank 0 (the coordinator of both) holds the lock
    run(1, HFSavePlanner())
    first.join(120)
    return outcome


@pytest.mark.slow
def test_saves_on_two_process_groups_one_wins_the_other_is_busy(tmp_path):
    path = tmp_path / "ckpt"
    assert run_ranks(_two_groups, 2, str(path), timeout=180) == [{0: "ok", 1: "busy"}] * 2
    assert same(loaded(path), state(1))
    assert no_leftovers(path)


# -- odd files at the lock's name ----------------------------------------------------------------
def _aged(lock, seconds=3600):
    old = time.time() - seconds
    os.utime(lock, (old, old), follow_symlinks=False)


@pytest.mark.parametrize("content", [b"", b"\x00garbage{", b"[1, 2]", b'{"pid": "x"}'])
def test_an_empty_or_garbage_lock_is_taken_over_once_it_cannot_be_being_written(tmp_path, content):
    path = tmp_path / "ckpt"
    lock = commit.lock_path(str(path))
    with open(lock, "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointException, match=f"its save lock {lock} is empty or unreadable.*remove it"):
        save(path, state(1))  # just written: maybe another save writing its lock
    _aged(lock)
    save(path, state(1))
    assert same(loaded(path), state(1))
    assert not os.path.lexists(lock)


def test_a_dead_owners_lock_in_an_odd_encoding_is_taken_over(tmp_path):
    path = tmp_path / "ckpt"
    lock = commit.lock_path(str(path))
    with open(lock, "w") as f:
        json.dump({"pid": 2**22 + 12345, "host": os.uname().nodename, "save_id": "x", "since": "never"}, f)
    save(path, state(1))
    assert same(loaded(path), state(1))


@pytest.mark.parametrize("kind", ["folder", "symlink to a file", "dangling symlink", "symlink to a folder"])
def test_a_folder_or_symlink_at_the_lock_is_refused_naming_it_and_never_followed(tmp_path, kind):
    path = tmp_path / "ckpt"
    lock = commit.lock_path(str(path))
    target = tmp_path / "target"
    if kind == "folder":
        os.mkdir(lock)
    elif kind == "symlink to a file":
        target.write_bytes(b"precious")
        os.symlink(target, lock)
    elif kind == "dangling symlink":
        os.symlink(target, lock)
    else:
        target.mkdir()
        os.symlink(target, lock)
    _aged(lock)
    what = "a folder" if kind == "folder" else "a symlink"
    with pytest.raises(CheckpointException, match=f"its save lock {lock} is {what}.*remove it \\(rm -r '{lock}'\\)"):
        save(path, state(1))
    assert os.path.lexists(lock)
    if kind == "symlink to a file":
        assert target.read_bytes() == b"precious"
    elif kind == "dangling symlink":
        assert not target.exists()
    elif kind == "symlink to a folder":
        assert os.listdir(target) == []
    assert not path.exists() or os.listdir(path) == []
    (os.rmdir if kind == "folder" else os.unlink)(lock)
    save(path, state(1))  # removed as told: the next save works
    assert same(loaded(path), state(1))
