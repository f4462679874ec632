"""Reads never mix two saves, and never hang or crash: loads racing overwrites give the old
checkpoint, the new one, or a dcp-hf error; a file of another save is refused by name; header
and data come from one open file; FIFOs and folders in place of a shard are refused; a file
truncated under the reader is an error, not SIGBUS."""

import multiprocessing
import os
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.boxes import box_runs, byte_view
from dcp_hf.errors import CheckpointFormatError, DcpHfError
from dcp_hf.storage.posix import read_runs

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models

SHARDED = 3000


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(16, 24, generator=g) for i in range(6)}


A, B = weights(1), weights(2)


def save(path, state, max_shard_size=SHARDED, overwrite=True):
    dcp.save(
        state,
        storage_writer=HFStorageWriter(path, max_shard_size=max_shard_size, overwrite=overwrite),
        planner=HFSavePlanner(),
        no_dist=True,
    )


def which(state) -> str:
    for name, ref in (("A", A), ("B", B)):
        if all(torch.equal(state[k], ref[k]) for k in ref):
            return name
    return "mix"


def load(path_or_reader) -> str:
    reader = path_or_reader if isinstance(path_or_reader, HFStorageReader) else HFStorageReader(path_or_reader)
    state = {k: torch.zeros_like(v) for k, v in A.items()}
    dcp.load(state, storage_reader=reader, planner=HFLoadPlanner(), no_dist=True)
    return which(state)


def _overwrite_forever(path, rounds):
    for i in range(rounds):  # alternate contents, and between sharded and one file
        save(path, B if i % 2 == 0 else A, SHARDED if i % 4 < 2 else 10**9)
    os._exit(0)


def test_loads_racing_overwrites_never_mix(tmp_path):
    path = tmp_path / "ckpt"
    save(path, A, overwrite=False)
    writer = multiprocessing.get_context("fork").Process(target=_overwrite_forever, args=(str(path), 150))
    writer.start()
    outcomes = {"A": 0, "B": 0, "mix": 0, "error": 0}
    try:
        for _ in range(400):
            if not writer.is_alive():
                break
            try:
                outcomes[load(path)] += 1
            except CheckpointException as e:
                for error, _ in e.failures.values():
                    assert isinstance(error, DcpHfError), repr(error)
                outcomes["error"] += 1
    finally:
        writer.join(120)
        if writer.is_alive():
            writer.kill()
    print(outcomes)
    assert writer.exitcode == 0
    assert outcomes["mix"] == 0, outcomes
    assert load(path) in ("A", "B")


def test_header_and_data_come_from_one_open_file(tmp_path):
    path = tmp_path / "ckpt"
    save(path, A, overwrite=False)
    reader = HFStorageReader(path)
    reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))  # every file open, headers read
    save(path, B)  # overwritten before the data is read: the open files are still A's
    assert load_from(reader) == "A"
    assert load(path) == "B"


def test_a_file_reopened_after_close_must_be_the_one_whose_header_was_read(tmp_path):
    path = tmp_path / "ckpt"
    save(path, A, overwrite=False)
    reader = HFStorageReader(path)
    reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))
    reader.close()
    save(path, B)  # B's files have other names; A's are removed after B's index is in place
    with pytest.raises(CheckpointFormatError, match=f"{path}/model-.*missing"):
        load_from(reader)


def load_from(reader):
    """A load with a reader whose headers are already read (DCP would reset it)."""
    state = {k: torch.zeros_like(v) for k, v in A.items()}
    planner = HFLoadPlanner()
    planner.set_up_planner(state, reader.read_metadata(), True)
    plan = reader.prepare_global_plan([planner.create_local_plan()])[0]
    reader.read_data(planner.finish_plan(plan), planner).wait()
    return which(state)


def test_a_file_of_another_save_is_refused_naming_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save(a, A, overwrite=False)
    save(b, B, overwrite=False)
    victim = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))[1]  # not the first
    os.replace(b / victim, a / victim)  # as an interrupted in-place commit would leave it
    with pytest.raises(
        CheckpointException,
        match=f"{a / victim}: written by save [0-9a-f]{{12}}, but "
        f"model.safetensors.index.json is of save [0-9a-f]{{12}}",
    ):
        load(a)


def _load_in_child(path, out):
    try:
        message = load(path)
    except CheckpointException as e:
        message = "; ".join(f"{type(err).__name__}: {err}" for err, _ in e.failures.values())
    with open(out, "w") as f:
        f.write(message)
    os._exit(0)


def load_in_child(path, tmp_path) -> str:
    """Load in a forked process with a timeout: a hang fails the test, not the suite."""
    out = tmp_path / "outcome.txt"
    child = multiprocessing.get_context("fork").Process(target=_load_in_child, args=(str(path), str(out)))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the load hung")
    assert child.exitcode == 0, f"the load crashed (exit code {child.exitcode})"
    return out.read_text()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_in_place_of_a_shard_is_refused_naming_it(tmp_path, kind):
    path = tmp_path / "ckpt"
    save(path, A, overwrite=False)
    victim = path / min(f for f in os.listdir(path) if f.endswith(".safetensors"))
    victim.unlink()
    os.mkfifo(victim) if kind == "fifo" else victim.mkdir()
    outcome = load_in_child(path, tmp_path)
    assert (
        outcome == f"CheckpointFormatError: {victim}: is a {'FIFO' if kind == 'fifo' else 'folder'}, "
        f"not a regular file; not reading it"
    )


def test_symlinked_shards_are_read(tmp_path):
    path, blobs = tmp_path / "ckpt", tmp_path / "blobs"
    save(path, A, overwrite=False)
    blobs.mkdir()
    for f in os.listdir(path):  # as the Hugging Face hub cache lays out a snapshot
        os.replace(path / f, blobs / f)
        os.symlink(blobs / f, path / f)
    assert load(path) == "A"


def _truncate_under_reads(file, rounds):
    with open(file, "rb") as f:
        data = f.read()
    fd = os.open(file, os.O_RDONLY)
    shape, width = (256, 512), 4  # a column shard of a float32 [256, 512]: 256 runs of 512 bytes
    grid = box_runs(shape, (0, 128), (256, 128), width)
    expected = torch.frombuffer(bytearray(data), dtype=torch.float32).view(shape)[:, 128:256].contiguous()
    stop, outcomes = threading.Event(), {"exact": 0, "error": 0}

    def truncate():
        with open(file, "r+b") as f:
            while not stop.is_set():
                f.truncate(len(data) // 3)
                f.seek(0)
                f.write(data)
                f.flush()

    thread = threading.Thread(target=truncate)
    thread.start()
    try:
        for _ in range(rounds):
            out = torch.empty(256, 128)
            try:
                read_runs(fd, 0, grid, byte_view(out), file)
            except CheckpointFormatError as e:
                assert "truncated?" in str(e) and file in str(e)
                outcomes["error"] += 1
                continue
            outcomes["exact"] += torch.equal(out, expected)
    finally:
        stop.set()
        thread.join()
    # A file rewritten in place under a reader can also read torn (dcp-hf's writers never do
    # that: they create new files and commit them by rename); what matters here is that the
    # truncation is seen as an error naming the file, and never as SIGBUS.
    os._exit(0 if outcomes["error"] > 0 else 3)


def test_a_file_truncated_under_the_reader_is_an_error_not_sigbus(tmp_path):
    file = tmp_path / "blob"
    file.write_bytes(torch.arange(256 * 512, dtype=torch.float32).numpy().tobytes())
    # spawned, not forked: a forked child of a process whose OpenMP pool is up can hang in torch
    child = multiprocessing.get_context("spawn").Process(target=_truncate_under_reads, args=(str(file), 300))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("hung")
    assert child.exitcode == 0, f"exit code {child.exitcode} (-7 is SIGBUS)"
