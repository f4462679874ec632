"""The exchange's byte bookkeeping, against byte positions computed independently with torch:
clipping a box's runs to a byte range, and parts assembled from the pieces of every chunk."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_hf.boxes import box_runs
from dcp_hf.storage.exchange import Holding, PartIndex, Region, assemble, pieces_in, plan_parts
from tests.strategies import shape_and_box


def _box(t, offsets, sizes):
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, n)
    return t


def byte_positions(shape, offsets, sizes, width):
    """The tensor-relative byte position of every byte of the box, in the box's own order."""
    positions = torch.arange(torch.Size(shape).numel() * width, dtype=torch.int64).view(*shape, width)
    return _box(positions, offsets, sizes).reshape(-1)


@settings(max_examples=300, deadline=None)
@given(shape_and_box(min_dims=0, max_dims=4, max_size=6), st.sampled_from([1, 2, 4]), st.data())
def test_clip_keeps_exactly_the_bytes_in_range(case, width, data):
    shape, offsets, sizes = case
    total = torch.Size(shape).numel() * width
    lo = data.draw(st.integers(0, total))
    hi = data.draw(st.integers(lo, total))
    grid = box_runs(shape, offsets, sizes, width)
    positions = byte_positions(shape, offsets, sizes, width)
    want = {(i, int(p)) for i, p in enumerate(positions.tolist()) if lo <= p < hi}
    got = []
    for g, at in grid.clip(lo, hi):
        for j, p in enumerate(s + k for s in g.starts() for k in range(g.run_len)):
            got.append((at + j, p))
    assert len(got) == len(set(got)) and set(got) == want
    assert len(grid.clip(lo, hi)) <= 2 * len(grid.counts) + 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 7), min_size=1, max_size=3),
    st.integers(1, 4),
    st.integers(1, 64),
    st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]),
)
def test_parts_assembled_from_column_chunks_are_the_file_bytes(shape, ranks, width, dtype):
    """Chunks split along the last dim over ``ranks`` ranks (short interleaved runs); parts of
    ``width`` bytes owned by whoever plan_parts picks; every part assembled from every rank's
    pieces must equal the tensor's bytes at that place of the file."""
    shape = tuple(shape)
    full = torch.randint(0, 255, shape, dtype=torch.int64).to(dtype)
    base, item = 11, full.element_size()  # an odd header size
    file_bytes = bytes(11) + full.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    last = shape[-1]
    cuts = [last * r // ranks for r in range(ranks + 1)]
    chunks = []
    for r in range(ranks):
        if cuts[r + 1] == cuts[r]:
            continue
        offsets = (0,) * (len(shape) - 1) + (cuts[r],)
        sizes = shape[:-1] + (cuts[r + 1] - cuts[r],)
        grid = box_runs(shape, offsets, sizes, item)
        chunks.append((r, grid, _box(full, offsets, sizes).contiguous()))
    holdings = [Holding(r, 0, base + g.span()[0], base + g.span()[1], g.nbytes) for r, g, _ in chunks]
    parts = plan_parts([Region(0, base, len(file_bytes), width)], holdings, round_bytes=3 * width)
    assert [p.lo for p in parts] == list(range(base, len(file_bytes), width))
    index = PartIndex(parts)
    for part in parts:
        pieces = [p for _, g, t in chunks for p in pieces_in(0, base, g, t, part.lo, part.hi)]
        assert all(index.of(0, p.offset) == part for p in pieces)
        assert assemble(part, b"", pieces).numpy().tobytes() == file_bytes[part.lo : part.hi]


def test_column_parts_are_shared_by_the_ranks():
    """Ranks holding equal shares of every part (column shards) own about equal numbers of parts."""
    shape, ranks = (64, 32), 4
    holdings = []
    for r in range(ranks):
        g = box_runs(shape, (0, 8 * r), (64, 8), 2)
        holdings.append(Holding(r, 0, g.span()[0], g.span()[1], g.nbytes))
    parts = plan_parts([Region(0, 0, 64 * 32 * 2, 256)], holdings, round_bytes=1 << 20)
    owners = [p.owner for p in parts]
    assert sorted(owners.count(r) for r in range(ranks)) == [4, 4, 4, 4]


def _save_columns(rank, world, root, socket, hosts=None):
    """Save column-sharded (and 2-D mesh) tensors with tiny parts and rounds, over shared
    memory or (``socket``) the process group, or (``hosts``: a folder standing for /dev/shm,
    one subfolder per host of two ranks) both; return this rank's local chunks for the oracle."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dcp_hf import HFSavePlanner, HFStorageWriter
    from dcp_hf.storage.exchange import SharedMemory

    SharedMemory.ROOT = "/nonexistent/dcp-hf-test" if socket else "/dev/shm"
    if hosts is not None:
        SharedMemory.ROOT = os.path.join(hosts, f"host{rank // 2}")
    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    g = torch.Generator().manual_seed(7)
    full = {
        "a.weight": torch.randn(37, 129, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(5, 6, 7, generator=g),
        "c.weight": torch.randint(-9, 9, (64, 33), generator=g, dtype=torch.int32),
        "d.weight": torch.randn(40, 24, generator=g).to(torch.bfloat16),
    }
    state = {
        "a.weight": distribute_tensor(full["a.weight"], mesh, [Shard(1)], src_data_rank=None),
        "b.weight": distribute_tensor(full["b.weight"], mesh, [Shard(2)], src_data_rank=None),
        "c.weight": distribute_tensor(full["c.weight"], mesh, [Shard(1)], src_data_rank=None),
        "d.weight": distribute_tensor(full["d.weight"], mesh2, [Shard(0), Shard(1)], src_data_rank=None),
    }
    writer = HFStorageWriter(root, part_size=300, round_bytes=900, max_shard_size=20_000, exchange_below="1MiB")
    dcp.save(state, storage_writer=writer, planner=HFSavePlanner())
    # plain lists: tensors sent back through the result queue share memory with a process that exits
    return {
        k: (tuple(v.__create_chunk_list__()[0].offsets), str(v.dtype), v.to_local().tolist()) for k, v in state.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("world,socket", [(2, False), (4, False), (4, True), (4, "hosts")])
def test_column_shards_saved_through_parts_are_the_tensors(tmp_path, world, socket):
    """Short runs go through parts (several rounds, several files); every rank's chunk must be
    at its place in the files, read back with safetensors (the oracle), on both transports."""
    from safetensors import safe_open

    from dcp_hf.local_ranks import run_ranks

    root = str(tmp_path / "ckpt")
    hosts = None
    if socket == "hosts":  # two hosts of two ranks: shared memory on each, the process group between
        hosts, socket = str(tmp_path / "shm"), False
        for h in (0, 1):
            os.makedirs(os.path.join(hosts, f"host{h}"))
    results = run_ranks(_save_columns, world, root, socket, hosts)
    found = {}
    for name in os.listdir(root):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(root, name), "pt") as f:
                found.update({k: f.get_tensor(k) for k in f.keys()})
    assert sorted(found) == ["a.weight", "b.weight", "c.weight", "d.weight"]
    assert len([n for n in os.listdir(root) if n.endswith(".safetensors")]) > 1
    for chunks in results:
        for key, (offsets, dtype, values) in chunks.items():
            assert str(found[key].dtype) == dtype, key
            local = torch.tensor(values, dtype=found[key].dtype)
            box = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
            assert torch.equal(found[key][box], local), key


def _collective_devices(rank, world):
    import torch.distributed as dist

    from dcp_hf.errors import DcpHfError
    from dcp_hf.storage.exchange import all_to_all, collective_device

    cuda_only = dist.new_group(list(range(world)), backend="cuda:gloo")  # as an NCCL-only group
    both = dist.new_group(list(range(world)), backend="cpu:gloo,cuda:gloo")
    out = {"world": str(collective_device(None)), "both": str(collective_device(both))}
    try:
        out["cuda_only"] = str(collective_device(cuda_only))
    except DcpHfError as e:
        out["cuda_only"] = f"error: {e}"
    got = torch.empty(world, dtype=torch.int64)
    all_to_all(got, torch.full((world,), rank, dtype=torch.int64), None, None, both)
    out["received"] = got.tolist()
    return out


@pytest.mark.slow
def test_collectives_take_tensors_on_the_groups_device():
    """CPU tensors where the group has a CPU backend; where it has none (an NCCL-only group: CPU
    tensors fail there with 'No backend type associated with device type cpu'), its device, or
    a clear error on a process without one."""
    from dcp_hf.local_ranks import run_ranks

    for rank, out in enumerate(run_ranks(_collective_devices, 2)):
        assert out["world"] == out["both"] == "cpu"
        assert out["received"] == [0, 1]
        if torch.cuda.is_available():
            assert out["cuda_only"].startswith("cuda:"), out
        else:
            assert out["cuda_only"].startswith("error: the process group (cuda:gloo) takes only cuda tensors"), out
