"""Saves and loads of ranks on two hosts (simulated: network and mount namespaces, see
testkit/two_hosts.py): the ranks of a host pass bytes through their shared memory, only what
the other host needs crosses the veth, once; the files are bit for bit the source tensors
(read back with safetensors' safe_open, the oracle), the loaded shards bit for bit
safe_open's slices; a killed host makes the other host's ranks fail with the reason."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from testkit.two_hosts import TwoHosts, available, network_bytes

pytestmark = pytest.mark.slow

SHAPES = {"a.weight": (512, 1024), "b.weight": (256, 2048), "c.weight": (128, 3072), "d.bias": (2048,)}
STATE_BYTES = sum(math.prod(s) for s in SHAPES.values()) * 2  # bf16


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(26)
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}


def _state(layout: str, empty: bool):
    """DTensors of the full tensors: ``shard1``: columns over the 4 ranks; ``within``: columns
    over the 2 hosts, replicated on the 2 ranks of a host (a 2 x 2 mesh, ranks 2h and 2h + 1
    on host h)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,) if layout == "shard1" else (2, world // 2))
    out = {}
    for key, t in full_tensors().items():
        dim = min(1, t.ndim - 1)
        placements = [Shard(dim)] if layout == "shard1" else [Shard(dim), Replicate()]
        out[key] = distribute_tensor(torch.zeros_like(t) if empty else t, mesh, placements, src_data_rank=None)
    return out


def _measured(fn):
    """Run ``fn`` on every rank between barriers; this host's network bytes meanwhile."""
    import torch.distributed as dist

    dist.barrier()
    before = network_bytes()
    fn()
    dist.barrier()
    after = network_bytes()
    return {k: after[k] - before[k] for k in before}


def _save_and_load(rank, world, root):
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter

    out = {}
    # Parts as on a network file system (short runs are not mapped there): 1 MiB parts.
    writer = HFStorageWriter(root, part_size="1MiB", exchange_below="1MiB", max_shard_size="1500KB")
    state = _state("shard1", empty=False)
    out["save"] = _measured(lambda: dcp.save(state, storage_writer=writer, planner=HFSavePlanner()))
    out["save"]["received"] = writer.bytes_from_other_hosts
    for layout in ("shard1", "within"):
        state = _state(layout, empty=True)
        reader = HFStorageReader(root, band_bytes=1 << 20)
        out[layout] = _measured(lambda: dcp.load(state, storage_reader=reader, planner=HFLoadPlanner()))
        out[layout]["received"] = reader.bytes_from_other_hosts
        out[layout]["read"] = reader.bytes_read
        bad = []
        files = {}
        for name in os.listdir(root):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(root, name), "pt") as f:
                    files.update({k: name for k in f.keys()})
        for key, d in state.items():
            chunk = d.__create_chunk_list__()[0]
            box = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
            with safe_open(os.path.join(root, files[key]), "pt") as f:
                if not torch.equal(d.to_local().view(torch.int16), f.get_slice(key)[box].view(torch.int16)):
                    bad.append(key)
        out[layout]["bad"] = bad
    return out


def _killed_host_load(rank, world, root):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFStorageReader

    class DyingReader(HFStorageReader):
        """Host 1 dies (all its processes, SIGKILL) as one of its ranks reads its first band."""

        def _read_band(self, band, out):
            if rank >= world // 2:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return super()._read_band(band, out)

    state = _state("shard1", empty=True)
    dcp.load(state, storage_reader=DyingReader(root, band_bytes=1 << 20), planner=HFLoadPlanner())
    return "loaded"


@pytest.fixture(scope="module")
def hosts():
    reason = available()
    if reason:
        pytest.skip(reason)
    with TwoHosts(per_host=2) as h:
        yield h


def test_two_hosts_save_and_load_send_each_byte_across_once(hosts, tmp_path):
    from safetensors import safe_open

    root = str(tmp_path / "ckpt")
    results = hosts.run(_save_and_load, root, timeout=240, pg_timeout=60)
    assert sorted(results) == [0, 1, 2, 3], results
    assert all(ok for ok, _ in results.values()), [v for ok, v in results.values() if not ok]
    found = {}
    for name in os.listdir(root):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(root, name), "pt") as f:
                found.update({k: f.get_tensor(k) for k in f.keys()})
    assert len([n for n in os.listdir(root) if n.endswith(".safetensors")]) > 1
    source = full_tensors()
    assert sorted(found) == sorted(source)
    for key, t in source.items():
        assert torch.equal(found[key].view(torch.int16), t.view(torch.int16)), key
    per_rank = [results[r][1] for r in range(4)]
    for case in ("save", "shard1", "within"):
        hosts_rx = [per_rank[2 * h][case]["rx"] for h in (0, 1)]  # one host's counter, read by each rank
        received = [per_rank[2 * h][case]["received"] + per_rank[2 * h + 1][case]["received"] for h in (0, 1)]
        # Every layout here: each byte sits on one host and the other needs it (the save: the
        # owner of a part has a quarter, its host half; the loads: each band is read once), so
        # half of the state crosses; each host receives what it lacks, once.
        assert sum(received) == pytest.approx(STATE_BYTES / 2, rel=0.02), (case, received)
        for rx, need in zip(hosts_rx, received):
            assert need <= rx <= 1.1 * need + (64 << 10), (case, hosts_rx, received)
        # Ranks of one host pass bytes through shared memory, not sockets.
        assert all(per_rank[2 * h][case]["lo"] < STATE_BYTES / 50 for h in (0, 1)), case
    for case in ("shard1", "within"):
        assert [r[case]["bad"] for r in per_rank] == [[]] * 4, case
        assert sum(r[case]["read"] for r in per_rank) <= 1.05 * STATE_BYTES, case


def test_a_killed_host_fails_the_other_with_the_reason(hosts, tmp_path):
    import subprocess
    import sys

    root = str(tmp_path / "ckpt")
    script = (
        "import torch, torch.distributed.checkpoint as dcp;"
        "from dcp_hf import HFSavePlanner, HFStorageWriter;"
        "from tests.test_two_hosts import full_tensors;"
        f"dcp.save(full_tensors(), storage_writer=HFStorageWriter({root!r}), planner=HFSavePlanner(), no_dist=True)"
    )
    subprocess.run(
        [sys.executable, "-c", script], check=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__))
    )
    start = time.monotonic()
    results = hosts.run(_killed_host_load, root, timeout=120, pg_timeout=60)
    assert time.monotonic() - start < 60  # the others learn it from the closed connections, not a timeout
    assert sorted(results) == [0, 1], results  # host 1's ranks died, host 0's finished
    for rank in (0, 1):
        ok, error = results[rank]
        assert not ok, error
        assert "Connection closed by peer" in error or "Connection reset by peer" in error, error
