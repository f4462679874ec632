"""Saving to and loading from any fsspec URL that is not S3 (memory://, local://; gs:// works
the same way through its own fsspec package): the same checkpoint as on disk, byte for byte."""

import os

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.local_ranks import run_ranks
from tests.workers import bitwise_equal, load_from_url, reference_state, save_to_url, save_with_fault, without_save_id


def _files(fs, root):
    return {p.rsplit("/", 1)[-1]: without_save_id(fs.cat_file(p)) for p in fs.ls(root, detail=False)}


def _local_reference(tmp_path):
    dcp.save(
        reference_state(),
        storage_writer=HFStorageWriter(tmp_path / "disk", max_shard_size=600),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    return {name: without_save_id((tmp_path / "disk" / name).read_bytes()) for name in os.listdir(tmp_path / "disk")}


def test_memory_url_in_one_process(tmp_path):
    sd = reference_state()
    url = "memory://dcp-hf-test/ckpt"
    dcp.save(sd, storage_writer=HFStorageWriter(url, max_shard_size=600), planner=HFSavePlanner(), no_dist=True)
    fs = fsspec.filesystem("memory")
    assert _files(fs, "/dcp-hf-test/ckpt") == _local_reference(tmp_path)
    out = {k: v.clone().zero_() for k, v in sd.items()}
    dcp.load(out, storage_reader=HFStorageReader(url), planner=HFLoadPlanner(), no_dist=True)
    assert all(bitwise_equal(out[k], sd[k]) for k in sd)
    fs.rm("/dcp-hf-test", recursive=True)


@pytest.mark.slow
def test_fsspec_url_from_every_rank(tmp_path):
    """Three ranks, each file written in order by the rank holding most of it (the others send
    it their bytes): the files equal a local save's; they load back resharded."""
    reference = _local_reference(tmp_path)
    for kind in ("shard0", "shard1", "mixed"):
        url = f"local://{tmp_path}/{kind}"
        run_ranks(save_to_url, 3, url, kind, {"max_shard_size": 600, "part_size": "5MiB"}, None)
        assert _files(fsspec.filesystem("local"), f"{tmp_path}/{kind}") == reference, kind
    assert run_ranks(load_from_url, 2, f"local://{tmp_path}/shard1", "shard0", None) == [[], []]


@pytest.mark.slow
def test_failed_fsspec_save_leaves_nothing(tmp_path):
    url = f"local://{tmp_path}/ckpt"
    results = run_ranks(save_with_fault, 3, url, "raise", 0, False)
    assert all(status == "error" for status, *_ in results), results
    assert any("injected failure while writing 'model.embed_tokens.weight'" in m for _, m, _ in results)
    assert not os.path.exists(tmp_path / "ckpt") or os.listdir(tmp_path / "ckpt") == []


class _FailsOnKey(HFSavePlanner):
    def __init__(self, key):
        super().__init__()
        self.key = key

    def resolve_data(self, write_item):
        if write_item.index.fqn == self.key:
            raise RuntimeError(f"injected failure while writing {self.key!r}")
        return super().resolve_data(write_item)


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_a_failed_overwrite_keeps_the_old_checkpoint(tmp_path, scheme):
    """An overwrite that fails after some of its files were written leaves the old checkpoint
    whole: new files go to hidden names and replace the old ones only once every file is whole."""
    url = f"local://{tmp_path}/ckpt" if scheme == "local" else f"memory://dcp-hf-fail-{tmp_path.name}/ckpt"
    old = reference_state()
    dcp.save(old, storage_writer=HFStorageWriter(url, max_shard_size=600), planner=HFSavePlanner(), no_dist=True)
    new = {k: (v.float() + 1).to(v.dtype) for k, v in old.items()}
    for failing in (sorted(new)[0], sorted(new)[-1]):
        with pytest.raises(CheckpointException, match="injected failure"):
            dcp.save(
                new,
                storage_writer=HFStorageWriter(url, max_shard_size=600, overwrite=True),
                planner=_FailsOnKey(failing),
                no_dist=True,
            )
        out = {k: torch.zeros_like(v) for k, v in old.items()}
        dcp.load(out, storage_reader=HFStorageReader(url), planner=HFLoadPlanner(), no_dist=True)
        assert all(bitwise_equal(out[k], old[k]) for k in old), failing
        fs, root = fsspec.core.url_to_fs(url)
        assert not [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(".")], failing
    dcp.save(
        new,
        storage_writer=HFStorageWriter(url, max_shard_size=600, overwrite=True),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    out = {k: torch.zeros_like(v) for k, v in old.items()}
    dcp.load(out, storage_reader=HFStorageReader(url), planner=HFLoadPlanner(), no_dist=True)
    assert all(bitwise_equal(out[k], new[k]) for k in new)
