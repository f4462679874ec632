"""Block digests (issue 24, case 6): files rewritten in place under a reader are detected by
verified loads and ``dcp-hf verify``. The oracle of every digest is google-crc32c (another
CRC-32C implementation) over the stored bytes, block by block."""

import hashlib
import json
import os
import random

import fsspec
import google_crc32c
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.boxes import RunGrid, box_runs
from dcp_hf.cli import main as cli_main
from dcp_hf.errors import root_cause
from dcp_hf.format import INDEX_NAME
from dcp_hf.format.digests import BLOCK, DIGESTS_KEY, BlockSums, ChecksumMismatchError, combine
from dcp_hf.local_ranks import run_ranks
from tests.cli_driver import run_cli
from tests.workers import bitwise_equal


def oracle_digests(blob: bytes, block: int) -> list[str]:
    return [f"{google_crc32c.value(blob[i : i + block]):08x}" for i in range(0, len(blob), block)]


def recorded(read, index_name: str = INDEX_NAME) -> dict:
    return json.loads(read(index_name))["metadata"][DIGESTS_KEY]


def assert_digests_match_the_bytes(read, index_name: str = INDEX_NAME) -> int:
    """Every file the index names has the oracle's digests; returns the number of blocks."""
    index = json.loads(read(index_name))
    digests = index["metadata"][DIGESTS_KEY]
    assert set(digests) == set(index["weight_map"].values())
    blocks = 0
    for name, rec in digests.items():
        assert rec["algo"] == "crc32c" and rec["block"] == BLOCK
        assert rec["digests"] == oracle_digests(read(name), BLOCK), name
        blocks += len(rec["digests"])
    return blocks


def big_state() -> dict[str, torch.Tensor]:
    """Files over several 4 MiB blocks, tensors that straddle block boundaries."""
    g = torch.Generator().manual_seed(1)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(1536, 1024, generator=g),  # 6 MiB
        "model.layers.0.mlp.down_proj.weight": torch.randn(1024, 1536, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(1024, generator=g),
        "model.embed_tokens.weight": torch.randn(999, 513, generator=g).to(torch.bfloat16),
    }


def flip(blob: bytes, at: int, n: int = 3) -> bytes:
    return blob[:at] + bytes(b ^ 0x5A for b in blob[at : at + n]) + blob[at + n :]


def offset_of(folder_read, key: str) -> tuple[str, int]:
    """The file holding ``key`` and the absolute offset of its data (from the header)."""
    index = json.loads(folder_read(INDEX_NAME))
    name = index["weight_map"][key]
    blob = folder_read(name)
    n = int.from_bytes(blob[:8], "little")
    begin, _ = json.loads(blob[8 : 8 + n])[key]["data_offsets"]
    return name, 8 + n + begin


# -- the combination, against whole-block CRCs ------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_pieces_from_several_writers_combine_to_each_blocks_crc(seed):
    """A file of random bytes, tiled by a header, column shards of a matrix (strided runs from
    3 writers), and contiguous ranges, with a small block size so that pieces cross blocks."""
    rng = random.Random(seed)
    block = rng.choice([64, 100, 257, 1000])
    rows, cols, itemsize = rng.randint(3, 40), rng.randint(3, 30), rng.choice([1, 2, 4])
    head = rng.randint(1, 300)
    tail = rng.randint(0, 900)
    size = head + rows * cols * itemsize + tail
    content = os.urandom(size)
    writers = [BlockSums([size], block) for _ in range(3)]
    writers[rng.randrange(3)].add_bytes(0, 0, content[:head])
    cuts = sorted(rng.sample(range(1, cols), 2)) if cols > 2 else [1, 1]
    for w, (c0, c1) in enumerate(zip([0, *cuts], [*cuts, cols])):
        if c1 == c0:
            continue
        grid = box_runs((rows, cols), (0, c0), (rows, c1 - c0), itemsize)
        data = b"".join(content[head + s : head + s + grid.run_len] for s in grid.starts())
        writers[w].add(0, head, grid, memoryview(data))
    at = head + rows * cols * itemsize
    while at < size:
        n = rng.randint(1, 400)
        writers[rng.randrange(3)].add(0, at, RunGrid(0, min(n, size - at)), memoryview(content)[at : at + n])
        at += n
    got = combine([w.sums for w in writers], ["f"], [size], block)["f"]
    assert [f"{d:08x}" for d in got.digests] == oracle_digests(content, block)


def test_a_byte_hashed_twice_or_never_is_refused():
    content = os.urandom(300)
    w = BlockSums([300], 100)
    w.add_bytes(0, 0, content[:250])
    with pytest.raises(Exception, match=r"f: the ranks hashed 50 of the 100 bytes of block 2"):
        combine([w.sums], ["f"], [300], 100)


# -- local: save, rewrite in place, detect --------------------------------------------------
def _save_local(path, state, **kw):
    dcp.save(state, storage_writer=HFStorageWriter(path, **kw), planner=HFSavePlanner(), no_dist=True)


def _load(path, state, **kw):
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=HFStorageReader(path, **kw), planner=HFLoadPlanner(), no_dist=True)
    return out


def test_a_file_rewritten_in_place_is_detected_by_verified_loads_and_dcp_hf_verify(tmp_path):
    path = tmp_path / "ckpt"
    state = big_state()
    _save_local(path, state, max_shard_size="8MB")

    def read(name):
        return (path / name).read_bytes()

    assert assert_digests_match_the_bytes(read) >= 3
    out = _load(path, state, verify=True)
    assert all(bitwise_equal(out[k], state[k]) for k in state)
    done = run_cli("verify", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK (crc32c") == len(set(json.loads(read(INDEX_NAME))["weight_map"].values()))

    # Another program rewrites 3 bytes of one tensor in place: same size, same mtime race.
    key = "model.layers.0.mlp.down_proj.weight"
    name, start = offset_of(read, key)
    victim = start + 3_000_000
    (path / name).write_bytes(flip(read(name), victim))
    unverified = _load(path, state)  # as before: loads the changed values without a word
    assert not torch.equal(unverified[key], state[key])
    with pytest.raises(BaseException) as err:
        _load(path, state, verify=True)
    cause = root_cause(err.value)
    assert isinstance(cause, ChecksumMismatchError), cause
    b = victim // BLOCK
    assert f"{path / name}: bytes {b * BLOCK}-" in str(cause) and f"(block {b}; " in str(cause)
    assert repr(key) in str(cause)
    assert "the file was changed after it was written" in str(cause)

    done = run_cli("verify", path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert f"{name}: MISMATCH (crc32c" in done.stdout
    assert (
        sum(": OK (crc32c" in line for line in lines)
        == len(set(json.loads(read(INDEX_NAME))["weight_map"].values())) - 1
    )
    assert f"(block {b}; " in done.stdout and repr(key) in done.stdout


def test_verified_loads_read_the_bytes_they_checked_also_in_column_shards_and_casts(tmp_path):
    """A verified load of boxes in short runs (a column of a matrix), into another dtype, reads
    through checked blocks and gives the same values as an unverified one."""
    path = tmp_path / "ckpt"
    state = big_state()
    _save_local(path, state, max_shard_size="8MB")
    key = "model.layers.0.mlp.up_proj.weight"
    for lengths, offsets in [((1536, 100), (0, 900)), ((7, 1024), (1000, 0))]:
        want = state[key][offsets[0] : offsets[0] + lengths[0], offsets[1] : offsets[1] + lengths[1]]
        from dcp_hf.tensor_box import TensorBox

        box = {key: TensorBox(torch.zeros(lengths, dtype=torch.float64), offsets, tuple(state[key].shape))}
        reader = HFStorageReader(path, verify=True, allow_dtype_cast=True)
        dcp.load(box, storage_reader=reader, planner=HFLoadPlanner(allow_unexpected=True), no_dist=True)
        assert torch.equal(box[key].local, want.double())


def test_checkpoints_without_digests_load_as_before_and_verify_says_so(tmp_path):
    state = {"w": torch.randn(4, 4), "b": torch.randn(3)}
    (tmp_path / "plain").mkdir()
    save_file(state, tmp_path / "plain" / "model.safetensors")
    out = _load(tmp_path / "plain", state, verify=True)
    assert all(bitwise_equal(out[k], state[k]) for k in state)
    done = run_cli("verify", tmp_path / "plain")
    assert done.returncode == 0, done.stderr
    assert "model.safetensors: no digest recorded" in done.stdout


def test_training_state_files_get_digests_too(tmp_path):
    path = tmp_path / "ckpt"
    g = torch.Generator().manual_seed(3)
    state = {
        "model": {"embed.weight": torch.randn(700, 1024, generator=g), "norm.weight": torch.randn(1024, generator=g)},
        "optimizer": {"exp_avg": torch.randn(1500, 1024, generator=g), "step": torch.tensor(7)},
    }
    dcp.save(
        state,
        storage_writer=HFStorageWriter(path, max_shard_size="4MB"),
        planner=HFSavePlanner(model_prefix="model."),
        no_dist=True,
    )

    def read(name):
        return (path / name).read_bytes()

    assert assert_digests_match_the_bytes(read, "training_state.safetensors.index.json") >= 2
    assert assert_digests_match_the_bytes(read) >= 1
    state_file = json.loads(read("training_state.safetensors.index.json"))["weight_map"][
        "training_state/optimizer.exp_avg"
    ]
    (path / state_file).write_bytes(flip(read(state_file), len(read(state_file)) - 10))
    target = {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "optimizer": {k: torch.zeros_like(v) for k, v in state["optimizer"].items()},
    }
    with pytest.raises(BaseException) as err:
        dcp.load(
            target,
            storage_reader=HFStorageReader(path, verify=True),
            planner=HFLoadPlanner(model_prefix="model."),
            no_dist=True,
        )
    assert isinstance(root_cause(err.value), ChecksumMismatchError)
    assert state_file in str(root_cause(err.value)) and "'training_state/optimizer.exp_avg'" in str(
        root_cause(err.value)
    )


# -- fsspec URLs ----------------------------------------------------------------------------
def test_a_rewrite_on_an_fsspec_url_is_detected(tmp_path, capsys):
    fs = fsspec.filesystem("memory")
    url = "memory://dcp-hf-digests/ckpt"
    state = big_state()
    try:
        _save_local(url, state, max_shard_size="8MB")

        def read(name):
            return fs.cat_file(f"/dcp-hf-digests/ckpt/{name}")

        assert assert_digests_match_the_bytes(read) >= 3
        key = "model.embed_tokens.weight"
        name, start = offset_of(read, key)
        fs.pipe_file(f"/dcp-hf-digests/ckpt/{name}", flip(read(name), start + 100))
        with pytest.raises(BaseException) as err:
            _load(url, state, verify=True)
        assert isinstance(root_cause(err.value), ChecksumMismatchError)
        assert f"{url}/{name}: bytes " in str(root_cause(err.value)) and repr(key) in str(root_cause(err.value))
        capsys.readouterr()
        assert cli_main(["verify", url]) == 1  # in this process: memory:// is the process's own
        out = capsys.readouterr().out
        assert f"{name}: MISMATCH" in out and repr(key) in out
    finally:
        fs.rm("/dcp-hf-digests", recursive=True)


# -- Hugging Face Hub downloads -------------------------------------------------------------
def test_a_hub_cache_blob_whose_name_is_not_its_sha256_is_reported(tmp_path):
    """A snapshot folder as huggingface_hub lays it out: files are links to blobs named by
    their sha256. One blob was changed after the download."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("c0ffee" * 6 + "abcd")
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    shards = {
        "model-00001-of-00002.safetensors": {"a": torch.randn(64, 64)},
        "model-00002-of-00002.safetensors": {"b": torch.randn(32)},
    }
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
        blob = (tmp_path / name).read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        (blobs / sha).write_bytes(blob)
        os.symlink(f"../../blobs/{sha}", snap / name)
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (snap / INDEX_NAME).write_text(json.dumps(index))
    done = run_cli("verify", snap)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("OK (sha256 recorded by the Hugging Face Hub)") == 2
    changed = os.path.realpath(snap / "model-00002-of-00002.safetensors")
    blob = open(changed, "rb").read()
    with open(changed, "wb") as f:
        f.write(flip(blob, len(blob) - 4))
    done = run_cli("verify", snap)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "model-00002-of-00002.safetensors: MISMATCH (sha256 recorded by the Hugging Face Hub)" in done.stdout
    assert f"but the Hugging Face Hub recorded {os.path.basename(changed)}" in done.stdout
    assert "model-00001-of-00002.safetensors: OK" in done.stdout


# -- several ranks: parts from several ranks in one file ---------------------------------------
def _save_sharded(rank, world, path, placement, writer_kwargs):
    mesh = init_device_mesh("cpu", (world,))
    state = {k: distribute_tensor(v, mesh, [placement(v)], src_data_rank=None) for k, v in big_state().items()}
    dcp.save(
        state, storage_writer=HFStorageWriter(path, max_shard_size="8MB", **writer_kwargs), planner=HFSavePlanner()
    )
    dist.barrier()
    return True


def _columns(v):
    return Shard(v.ndim - 1)


def _rows(v):
    return Shard(0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,placement,writer_kwargs",
    [
        (3, _columns, {}),  # interleaved runs of 3 ranks in every block, through a shared mapping
        (2, _columns, {"exchange_below": "1MiB", "part_size": "1MiB"}),  # parts assembled from both ranks
        (4, _rows, {}),  # row chunks of 4 ranks meeting inside blocks
    ],
)
def test_a_save_of_several_ranks_records_the_digests_of_the_bytes_on_disk(tmp_path, world, placement, writer_kwargs):
    path = tmp_path / "ckpt"
    assert run_ranks(_save_sharded, world, str(path), placement, writer_kwargs) == [True] * world
    assert assert_digests_match_the_bytes(lambda n: (path / n).read_bytes()) >= 3


def _load_verified(rank, world, path, placement):
    mesh = init_device_mesh("cpu", (world,))
    state = {
        k: distribute_tensor(torch.zeros_like(v), mesh, [placement(v)], src_data_rank=None)
        for k, v in big_state().items()
    }
    try:
        dcp.load(state, storage_reader=HFStorageReader(path, verify=True), planner=HFLoadPlanner())
    except BaseException as e:  # CheckpointException derives from BaseException
        cause = root_cause(e)
        return f"{type(cause).__name__}: {cause}"
    return "loaded"


@pytest.mark.slow
@pytest.mark.parametrize("placement", [_columns, _rows])
def test_a_verified_load_of_several_ranks_fails_on_every_rank_naming_the_file(tmp_path, placement):
    """Column boxes go through bands read by one rank and sent to the other; row boxes are read
    by each rank. Either way every rank raises, naming the changed file."""
    path = tmp_path / "ckpt"
    _save_local(path, big_state(), max_shard_size="8MB")
    key = "model.layers.0.mlp.up_proj.weight"
    name, start = offset_of(lambda n: (path / n).read_bytes(), key)
    (path / name).write_bytes(flip((path / name).read_bytes(), start + 6_000_000))
    results = run_ranks(_load_verified, 2, str(path), placement)
    for result in results:
        assert f"{path / name}: bytes {BLOCK}-" in result and "the file was changed after it was written" in result, (
            result
        )


# -- S3 --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_rewrite_on_s3_is_detected(s3, tmp_path):
    bucket = s3.bucket("dcp-hf-digests")
    url = f"s3://{bucket}/ckpt"
    state = big_state()
    dcp.save(
        state,
        storage_writer=HFStorageWriter(url, max_shard_size="8MB", storage_options=s3.storage_options),
        planner=HFSavePlanner(),
        no_dist=True,
    )

    def read(name):
        return s3.client.get_object(Bucket=bucket, Key=f"ckpt/{name}")["Body"].read()

    assert assert_digests_match_the_bytes(read) >= 3
    done = run_cli("verify", url, env={**os.environ, **s3.env})
    assert done.returncode == 0, done.stdout + done.stderr
    key = "model.layers.0.mlp.up_proj.weight"
    name, start = offset_of(read, key)
    s3.client.put_object(Bucket=bucket, Key=f"ckpt/{name}", Body=flip(read(name), start + 4_200_000))
    with pytest.raises(BaseException) as err:
        _load(url, state, verify=True, storage_options=s3.storage_options)
    assert isinstance(root_cause(err.value), ChecksumMismatchError)
    assert f"{url}/{name}: bytes {BLOCK}-" in str(root_cause(err.value))
    done = run_cli("verify", url, env={**os.environ, **s3.env})
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{name}: MISMATCH" in done.stdout and repr(key) in done.stdout
