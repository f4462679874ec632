"""Loads of several ranks whose boxes lie in short runs (column shards, 2-D meshes, 3-D
tensors): each byte is read once by one rank in bands, then sent to the ranks that need it.

The checkpoint is written by safetensors itself and every loaded shard is compared bit for bit
with ``safe_open``'s slice of the same box (an oracle independent of dcp-hf)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dcp_hf import HFLoadPlanner, HFStorageReader
from dcp_hf.local_ranks import run_ranks
from dcp_hf.storage.exchange import SharedMemory
from dcp_hf.storage.shared_reads import Need, _plan_round, plan_bands
from tests.workers import bitwise_equal

FILES = {
    "model-00001-of-00002.safetensors": {
        "a.bf16": ((37, 15), torch.bfloat16),  # rows (and columns) divisible by neither 2 nor 4
        "b.f32": ((16, 24), torch.float32),
        "c.i64": ((9, 6), torch.int64),  # smaller than any band
        "d.f16": ((16, 12, 3), torch.float16),  # 3-D
    },
    "model-00002-of-00002.safetensors": {
        "e.big": ((300, 64), torch.bfloat16),  # many bands when bands are small
        "f.vec": ((40,), torch.float32),  # 1-D: one run per rank, read directly
        "g.mask": ((10, 7), torch.bool),  # odd sizes: what follows it in a buffer must stay aligned
    },
}
SMALL = {"band_bytes": 512, "round_bytes": 4096}  # many bands and rounds


def _tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("exchange"))
    weight_map, seed = {}, 0
    for file, tensors in FILES.items():
        state = {}
        for key, (shape, dtype) in tensors.items():
            state[key] = _tensor(shape, dtype, seed)
            weight_map[key] = file
            seed += 1
        save_file(state, os.path.join(root, file), metadata={"format": "pt"})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return root


def _placements(kind: str, ndim: int):
    if kind == "shard1":
        return [Shard(min(1, ndim - 1))]
    if kind == "last":  # the last dim: for the 3-D tensor, runs of 1-2 elements
        return [Shard(ndim - 1)]
    if kind == "2d":
        return [Shard(0), Shard(min(1, ndim - 1))] if ndim > 1 else [Shard(0), Replicate()]
    if kind == "cols_replicated":  # two ranks need the same bytes
        return [Replicate(), Shard(min(1, ndim - 1))]
    if kind == "replicated_within":  # the two ranks of a host (ranks 2h, 2h+1) need the same bytes
        return [Shard(min(1, ndim - 1)), Replicate()]
    raise ValueError(kind)


def _state(kind: str, cast: bool = False) -> dict[str, DTensor]:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,) if kind in ("shard1", "last") else (2, world // 2))
    out = {}
    for tensors in FILES.values():
        for key, (shape, dtype) in tensors.items():
            dtype = torch.float32 if cast and dtype == torch.bfloat16 else dtype
            full = torch.zeros(shape, dtype=dtype)
            out[key] = distribute_tensor(full, mesh, _placements(kind, len(shape)), src_data_rank=None)
    return out


def _oracle_mismatches(root: str, state: dict[str, DTensor]) -> list[str]:
    """Keys whose local shard is not bit for bit safe_open's slice of the same box."""
    bad = []
    for file, tensors in FILES.items():
        with safe_open(os.path.join(root, file), "pt") as f:
            for key in tensors:
                local = state[key].to_local()
                chunk = state[key].__create_chunk_list__()[0]
                box = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
                if not bitwise_equal(local, f.get_slice(key)[box].to(local.dtype)):
                    bad.append(key)
    return bad


def _load(
    root: str,
    kind: str,
    cast: bool = False,
    socket: bool = False,
    oracle: str | None = None,
    hosts: str | None = None,
    **reader_kwargs,
):
    """``socket``: the ranks exchange bands over the process group, as ranks on different
    hosts do (no shared memory). ``oracle``: the local copy of ``root`` (a URL). ``hosts``: a
    folder standing for /dev/shm, one subfolder per host of two ranks (ranks of two hosts
    share memory only with their host)."""
    state = _state(kind, cast)
    reader = HFStorageReader(root, allow_dtype_cast=cast, **reader_kwargs)
    SharedMemory.ROOT = "/nonexistent/dcp-hf-test" if socket else "/dev/shm"
    if hosts is not None:
        SharedMemory.ROOT = os.path.join(hosts, f"host{dist.get_rank() // 2}")
    dcp.load(state, storage_reader=reader, planner=HFLoadPlanner())
    needed = sum(math.prod(v.to_local().shape) * FILES_DTYPE[k].itemsize for k, v in state.items())
    return {"bad": _oracle_mismatches(oracle or root, state), "read": reader.bytes_read, "needed": needed}


FILES_DTYPE = {key: dtype for tensors in FILES.values() for key, (_, dtype) in tensors.items()}


def _load_cases(rank, world, root, cases):
    return {name: _load(root, kind, **kwargs) for name, kind, kwargs in cases}


CASES_2 = [
    ("shard1", "shard1", {}),
    ("shard1 small bands over the process group, cast", "shard1", {"socket": True, "cast": True, **SMALL}),
    ("last dim small bands", "last", SMALL),
    ("shard1 no bands", "shard1", {"band_bytes": 0}),
]
CASES_4 = [
    ("2d", "2d", {}),
    ("2d small bands over the process group", "2d", {"socket": True, **SMALL}),
    ("last dim small bands", "last", SMALL),
    ("cols replicated small bands", "cols_replicated", SMALL),
]


@pytest.mark.parametrize(
    "world, cases", [(2, CASES_2), (4, CASES_4), (4, "hosts")], ids=["2 ranks", "4 ranks", "2 hosts"]
)
@pytest.mark.slow
def test_loads_match_safe_open_and_read_each_byte_once(checkpoint, world, cases, tmp_path):
    if cases == "hosts":  # two hosts of two ranks: shared memory on each, the process group between
        for h in (0, 1):
            os.makedirs(tmp_path / f"host{h}")
        cases = [
            (name, kind, {**kwargs, "hosts": str(tmp_path)})
            for name, kind, kwargs in [
                ("2d, two hosts", "2d", SMALL),
                ("shard1 small bands, two hosts", "shard1", SMALL),
                ("cols replicated across hosts", "cols_replicated", SMALL),
                ("replicated within hosts", "replicated_within", SMALL),
            ]
        ]
    results = run_ranks(_load_cases, world, checkpoint, cases, timeout=240, pg_timeout=120)
    for name, _, kwargs in cases:
        per_rank = [r[name] for r in results]
        assert [r["bad"] for r in per_rank] == [[]] * world, name
        read, needed = sum(r["read"] for r in per_rank), sum(r["needed"] for r in per_rank)
        if kwargs.get("band_bytes") == 0:
            assert read > 1.5 * needed, name  # each rank reads spans holding the others' columns
        elif name.startswith(("cols replicated", "replicated within")):
            assert read <= 1.05 * needed / 2, name  # two ranks need each byte: it is read once
        else:
            assert read <= 1.05 * needed, (name, read, needed)


@pytest.mark.slow
def test_loads_from_s3(s3, checkpoint):
    """Bands are single ranged GETs; each byte of the column shards is fetched once."""
    url = s3.upload_folder(checkpoint, s3.bucket("dcp-hf-bands"), "ckpt")
    cases = [
        (name, kind, {**kwargs, "oracle": checkpoint, "storage_options": s3.storage_options})
        for name, kind, kwargs in [
            ("shard1", "shard1", {}),
            ("shard1 over the process group", "shard1", {"socket": True, **SMALL}),
        ]
    ]
    results = run_ranks(_load_cases, 2, url, cases, timeout=240, pg_timeout=120)
    for name, _, _ in cases:
        assert [r[name]["bad"] for r in results] == [[], []], name
        read, needed = sum(r[name]["read"] for r in results), sum(r[name]["needed"] for r in results)
        assert read <= 1.05 * needed, (name, read, needed)


def _need(key, shape, offsets, lengths, dtype=torch.bfloat16):
    return Need(key, "f", 0, shape, dtype, offsets, lengths)


def test_band_plan_cuts_rows_and_balances_owners():
    """Two ranks each need half the columns of a 100-row tensor (8 rows a band): every row is in
    exactly one band, every band holds both ranks' pieces, and the owners alternate."""
    shape = (100, 64)  # 128 bytes a row
    needs = [[_need("w", shape, (0, 0), (100, 32))], [_need("w", shape, (0, 32), (100, 32))]]
    plan = plan_bands(needs, band_bytes=8 * 128, round_bytes=10_000)
    assert [(b.r0, b.r1) for b in plan.bands] == [(r, min(100, r + 8)) for r in range(0, 100, 8)]
    assert all({p.rank for p in b.pieces} == {0, 1} for b in plan.bands)
    owners = [b.owner for b in plan.bands]
    assert abs(owners.count(0) - owners.count(1)) <= 1
    assert plan.shared == [{0}, {0}]
    # Rounds bound what a rank holds: a band (1 KiB), what its owner sends and receives.
    assert plan.rounds > 1 and all(b.round <= plan.rounds - 1 for b in plan.bands)


def test_band_plan_leaves_sparse_boxes_to_their_rank():
    """One rank needing a tenth of the columns: reading whole rows would read 10x; it reads
    its own runs instead."""
    needs = [[_need("w", (100, 640), (0, 0), (100, 64))], []]
    plan = plan_bands(needs, band_bytes=1 << 20, round_bytes=1 << 30)
    assert plan.bands == [] and plan.shared == [set(), set()]


def _faulty_loads(rank, world, roots):
    """Each truncation on its own copy (a later load would find the truncation in the header)."""
    return {
        "dtype": _faulty_load(rank, roots[0], "dtype"),
        "truncated": _faulty_load(rank, roots[0], "truncated"),
        "truncated, socket": _faulty_load(rank, roots[1], "truncated, socket"),
    }


def _faulty_load(rank, root, fault):
    state = _state("shard1")
    SharedMemory.ROOT = "/nonexistent/dcp-hf-test" if "socket" in fault else "/dev/shm"
    if fault == "dtype" and rank == 1:
        local = state["b.f32"].to_local()
        state["b.f32"] = DTensor.from_local(
            local.to(torch.float64), state["b.f32"].device_mesh, state["b.f32"].placements, run_check=False
        )

    class TruncatingPlanner(HFLoadPlanner):
        """Truncates the second file (from rank 1) after every header is read, before reading."""

        def finish_plan(self, central_plan):
            if rank == 1:
                path = os.path.join(root, "model-00002-of-00002.safetensors")
                os.truncate(path, os.path.getsize(path) - 40)  # inside the last band (g.mask)
            dist.barrier()
            return super().finish_plan(central_plan)

    planner = TruncatingPlanner() if fault.startswith("truncated") else HFLoadPlanner()
    try:
        dcp.load(state, storage_reader=HFStorageReader(root, **SMALL), planner=planner)
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException; the message is what the test checks
        return str(e)
    return None


@pytest.mark.slow
def test_a_failure_on_one_rank_reaches_every_rank_without_hanging(checkpoint, tmp_path):
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    for root in roots:
        os.makedirs(root)
        for name in os.listdir(checkpoint):
            with open(os.path.join(checkpoint, name), "rb") as src, open(os.path.join(root, name), "wb") as dst:
                dst.write(src.read())
    results = run_ranks(_faulty_loads, 2, roots, timeout=120, pg_timeout=60)
    errors = [r["dtype"] for r in results]
    assert all("'b.f32' is torch.float32 in the checkpoint but torch.float64" in e for e in errors), errors
    for fault in ("truncated", "truncated, socket"):
        # The band's owner raises its error, the other rank (which waited for the band) says so.
        for e in [r[fault] for r in results]:  # DCP gathers every rank's error into each rank's
            assert "model-00002-of-00002.safetensors: unexpected end of file" in e, e
            assert "PeerRankError: rank" in e and " of 2 failed (1 in all): CheckpointFormatError" in e, e


def test_boxes_cross_to_each_host_once():
    """Two hosts of two ranks; the ranks of a host need the same columns (Shard(1) across
    hosts, replicated within): each band's box for the other host crosses once, to one rank
    of it, and both ranks of that host take it from there."""
    shape = (64, 64)  # 128 bytes a row
    halves = [(0, 0), (0, 0), (0, 32), (0, 32)]
    needs = [[_need("w", shape, off, (64, 32))] for off in halves]
    hosts = [0, 0, 2, 2]
    plan = plan_bands(needs, band_bytes=8 * 128, round_bytes=4 * 1024)
    assert plan.rounds > 1
    crossed = 0
    for r in range(plan.rounds):
        rnd = _plan_round([b for b in plan.bands if b.round == r], needs, hosts, shared=True)
        for band in rnd.bands:
            other = [p for p in band.pieces if hosts[p.rank] != hosts[band.owner]]
            assert len(other) == 2  # both ranks of the other host need the band's other half
            assert {rnd.via[(band, p)] for p in other} == {t for t in rnd.transfers if t.band == band}
            assert len({rnd.via[(band, p)] for p in other}) == 1
        crossed += sum(needs[t.piece.rank][t.piece.index].rows_bytes(t.piece.r1 - t.piece.r0) for t in rnd.transfers)
    assert crossed == 64 * 32 * 2 * 2 // 2  # half of what the two hosts need: the half each lacks
    # Without shared memory every rank is a host of its own: each rank gets its box.
    rnd = _plan_round([b for b in plan.bands if b.round == 0], needs, list(range(4)), shared=False)
    assert len(rnd.transfers) == sum(len([p for p in b.pieces if p.rank != b.owner]) for b in rnd.bands)
