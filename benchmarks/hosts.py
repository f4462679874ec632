"""Saves and loads of 4 ranks on two simulated hosts (testkit/two_hosts.py: network namespaces
joined by a veth pair, a private /dev/shm per host, gloo across the veth, the checkpoint on
the shared disk).

``ours``: the hierarchical exchange (ranks of a host share memory; what another host needs
crosses once). ``flat``: the same code with shared memory off, every exchanged byte over the
process group, as any job of several hosts did before (a host's ranks then talk over its
loopback). Per host: bytes received over the veth against the bytes it needs from the other
host (the parts its ranks assemble from the other host's pieces, the band boxes of bands
read there), and bytes through its loopback. The save writes through parts (as on a network
file system, where short runs are not mapped).
"""

from __future__ import annotations

import math
import os
import shutil

import torch

LAYOUTS = {"shard1": "Shard(1) over 4 ranks", "within": "Shard(1) over the hosts, replicated within a host"}


def _state(shape, layout: str, empty: bool) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from benchmarks.core import _fill

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,) if layout == "shard1" else (2, world // 2))
    out = {}
    for i, (key, full) in enumerate(shape.tensors().items()):
        dim = min(1, len(full) - 1)
        placements = [Shard(dim)] if layout == "shard1" else [Shard(dim), Replicate()]
        sizes, offsets = compute_local_shape_and_global_offset(full, mesh, placements)
        local = torch.empty(sizes, dtype=torch.bfloat16)
        local.zero_() if empty else _fill(local, i * 1000 + dist.get_rank())  # saves: Shard(1), no replicas
        out[key] = DTensor.from_local(
            local, mesh, placements, shape=torch.Size(full), stride=torch.empty(full, device="meta").stride()
        )
    return out


def worker(rank: int, world: int, shape, root: str, repeat: int):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from benchmarks.measure import measured
    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
    from dcp_hf.storage.exchange import SharedMemory
    from testkit.two_hosts import network_bytes

    ckpt = os.path.join(root, "checkpoint")
    samples: dict = {}
    cases = [("save", "shard1")] + [("load", layout) for layout in LAYOUTS]
    for mode, layout in cases:
        state = _state(shape, layout, empty=mode == "load")
        for r in range(repeat):
            for op in ["ours", "flat"] if r % 2 == 0 else ["flat", "ours"]:
                SharedMemory.ROOT = "/dev/shm" if op == "ours" else "/nonexistent/dcp-hf-flat"
                if mode == "save":
                    store = HFStorageWriter(ckpt, overwrite=True, exchange_below="256KiB")
                    fn = lambda: dcp.save(state, storage_writer=store, planner=HFSavePlanner())  # noqa: E731
                else:
                    store = HFStorageReader(ckpt)
                    fn = lambda: dcp.load(state, storage_reader=store, planner=HFLoadPlanner())  # noqa: E731
                dist.barrier()
                before = network_bytes()
                sample = measured(fn)
                dist.barrier()
                after = network_bytes()
                sample.update({k: after[k] - before[k] for k in before})
                sample["needed"] = store.bytes_from_other_hosts
                if mode == "load":
                    sample["read"] = store.bytes_read
                samples.setdefault(f"{mode} {layout}", {}).setdefault(op, []).append(sample)
        if mode == "save":  # the loads read the last save, of ours
            dist.barrier()
    return samples


def run(root: str, size_gb: float, repeat: int) -> list[dict]:
    from benchmarks.core import scaled_shape
    from benchmarks.measure import merge_ranks, summarize
    from testkit.two_hosts import TwoHosts, available

    reason = available()
    if reason:
        print(f"  hosts: skipped ({reason})")
        return []
    # Llama-1B widths with a 32k vocabulary, so a small state still has several layers
    from dcp_hf.models import LlamaShape

    base = scaled_shape(size_gb).describe()
    shape = LlamaShape(**{**base, "vocab": 32000, "layers": max(1, round(size_gb / 0.121 - 0.5))})
    nbytes = sum(math.prod(s) for s in shape.tensors().values()) * 2
    os.makedirs(root, exist_ok=True)
    with TwoHosts(per_host=2) as hosts:
        got = hosts.run(worker, shape, root, repeat, timeout=3000, pg_timeout=600)
    shutil.rmtree(root, ignore_errors=True)
    failed = {r: v for r, (ok, v) in got.items() if not ok}
    if failed or len(got) != 4:
        raise RuntimeError(f"hosts benchmark failed: {failed or sorted(got)}")
    per_rank = [got[r][1] for r in range(4)]
    results = []
    for case in per_rank[0]:
        mode, layout = case.split(" ", 1)
        name = f"{mode}, 2 hosts x 2 ranks, {LAYOUTS[layout]}"
        result = {"case": name, "mode": mode, "world": 4, "layout": layout, "state_bytes": nbytes, "ops": {}}
        result["network"] = {}
        for op in per_rank[0][case]:
            merged = [merge_ranks([r[case][op][i] for r in per_rank]) for i in range(repeat)]
            result["ops"][op] = summarize(merged, nbytes)
            best = min(range(repeat), key=lambda i: merged[i]["seconds"])
            # a host's counters are read by both its ranks: take the first rank's
            # what a host needs from the other: counted by ours (flat counts its own host's bytes too)
            needed = [
                per_rank[2 * h][case]["ours"][0]["needed"] + per_rank[2 * h + 1][case]["ours"][0]["needed"]
                for h in (0, 1)
            ]
            result["network"][op] = {
                "rx_per_host": [per_rank[2 * h][case][op][best]["rx"] for h in (0, 1)],
                "needed_per_host": needed,
                "loopback_per_host": [per_rank[2 * h][case][op][best]["lo"] for h in (0, 1)],
            }
        results.append(result)
    print(network_table(results))
    return results


def network_table(results: list[dict]) -> str:
    rows = [
        "| case | operation | GB/s best / median | host 0: veth received MB / needed MB (ratio) | host 1: same "
        "| loopback MB per host |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for op, net in r.get("network", {}).items():
            s = r["ops"][op]
            cells = []
            for rx, need in zip(net["rx_per_host"], net["needed_per_host"]):
                ratio = f"{rx / need:.3f}" if need else "—"
                cells.append(f"{rx / 1e6:.1f} / {need / 1e6:.1f} ({ratio})")
            lo = " / ".join(f"{b / 1e6:.1f}" for b in net["loopback_per_host"])
            rows.append(
                f"| {r['case']} | {op} | {s['gbps']:.2f} / {s['gbps_median']:.2f} | {cells[0]} | {cells[1]} | {lo} |"
            )
    return "\n".join(rows)
