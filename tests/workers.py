"""Functions that run on each rank (importable by spawned processes)."""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.boxes import byte_view


def reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The full tensors every rank can rebuild deterministically."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(37, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 24, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 12, 3, generator=g).to(torch.float16),
        "model.layers.1.input_layernorm.weight": torch.randn(16, generator=g),
        "model.layers.10.counter": torch.arange(7, dtype=torch.int64),
        "model.layers.2.mask": torch.rand(5, 3, generator=g) > 0.5,
        "model.scale": torch.tensor(1.5),
        "model.fp8": torch.randn(8, 4, generator=g).to(torch.float8_e4m3fn),
    }


def placements_for(name: str, ndim: int, kind: str):
    """Placement per tensor for a layout kind."""
    if ndim == 0:
        return [Replicate()]
    if kind == "shard0":
        return [Shard(0)]
    if kind == "shard1":
        return [Shard(min(1, ndim - 1))]
    if kind == "replicate":
        return [Replicate()]
    if kind == "mixed":  # different dims for different tensors
        return [Shard(zlib.crc32(name.encode()) % ndim)]
    raise ValueError(kind)


def sharded_state(kind: str, seed: int = 0, zeros: bool = False) -> dict[str, DTensor]:
    world = dist.get_world_size()
    full = reference_state(seed)
    if kind == "2d":
        mesh = init_device_mesh("cpu", (2, world // 2))
        out = {}
        for k, v in full.items():
            v = torch.zeros_like(v) if zeros else v
            pl = [Shard(0), Shard(v.ndim - 1)] if v.ndim else [Replicate(), Replicate()]
            out[k] = distribute_tensor(v, mesh, pl, src_data_rank=None)
        return out
    mesh = init_device_mesh("cpu", (world,))
    return {
        k: distribute_tensor(
            torch.zeros_like(v) if zeros else v, mesh, placements_for(k, v.ndim, kind), src_data_rank=None
        )
        for k, v in full.items()
    }


def save_sharded(rank, world, path, kind, writer_kwargs):
    sd = sharded_state(kind)
    dcp.save(sd, storage_writer=HFStorageWriter(path, **writer_kwargs), planner=HFSavePlanner())
    return True


def local_mismatches(sd: dict[str, DTensor], full: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose local shard differs (bitwise) from the same box of the full reference."""
    bad = []
    for k, v in sd.items():
        for chunk in v.__create_chunk_list__():
            expected = full[k]
            for d, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes)):
                expected = expected.narrow(d, o, n)
            if not bitwise_equal(v.to_local(), expected):
                bad.append(k)
    return bad


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return bytes(byte_view(a)) == bytes(byte_view(b))


def load_sharded(rank, world, path, kind):
    """Load into a zeroed sharded state of ``kind``; return the keys that differ from the reference."""
    sd = sharded_state(kind, zeros=True)
    dcp.load(sd, storage_reader=HFStorageReader(path), planner=HFLoadPlanner())
    return local_mismatches(sd, reference_state())


def sharded_tensor_two_chunks(rank: int, world: int, key: str, shape=(8, 6), zeros=False):
    """A ShardedTensor whose dim 0 is cut in 2*world chunks, two of them on each rank."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    full = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    rows = shape[0] // (2 * world)
    shards = []
    for c in (rank, rank + world):
        local = full[c * rows : (c + 1) * rows].clone()
        shards.append(
            STShard(
                torch.zeros_like(local) if zeros else local,
                ShardMetadata([c * rows, 0], [rows, shape[1]], f"rank:{rank}/cpu"),
            )
        )
    return init_from_local_shards(shards, *shape), full


def save_cases(rank, world, root):
    """Save one checkpoint per layout kind, plus a ShardedTensor with two chunks per rank and
    an async save; then check the failures every rank must see."""
    import os

    from torch.distributed.checkpoint.api import CheckpointException

    for kind in ("shard0", "shard1", "mixed", "replicate"):
        save_sharded(rank, world, f"{root}/{kind}", kind, {"max_shard_size": 600})
    st, _ = sharded_tensor_two_chunks(rank, world, "st", shape=(8, 6))
    dcp.save(
        {"st": st, "x": torch.ones(3)},
        storage_writer=HFStorageWriter(f"{root}/sharded_tensor"),
        planner=HFSavePlanner(),
    )
    fut = dcp.async_save(
        sharded_state("shard1"),
        storage_writer=HFStorageWriter(f"{root}/async", max_shard_size=600),
        planner=HFSavePlanner(),
    )
    fut.result()
    errors = {}
    bad_cases = {
        "non_tensor": {"w": torch.ones(2), "step": 7},
        "inconsistent": {"w": torch.ones(2 + rank)},
    }
    for name, sd in bad_cases.items():
        try:
            dcp.save(sd, storage_writer=HFStorageWriter(f"{root}/bad_{name}"), planner=HFSavePlanner())
            errors[name] = None
        except CheckpointException as e:
            errors[name] = str(e)
        errors[name + "_files"] = os.listdir(f"{root}/bad_{name}") if os.path.exists(f"{root}/bad_{name}") else []
    return errors


def load_cases(rank, world, root):
    """Load every checkpoint written by save_cases into another sharding; return mismatches."""
    import os

    from torch.distributed.checkpoint.api import CheckpointException

    bad = {}
    for saved in ("shard0", "shard1", "mixed", "replicate", "async"):
        for kind in ("shard0", "shard1", "mixed"):
            wrong = load_sharded(rank, world, f"{root}/{saved}", kind)
            if wrong:
                bad[f"{saved}->{kind}"] = wrong
    # The ShardedTensor checkpoint, read into a column-sharded DTensor.
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(48, dtype=torch.float32).view(8, 6)
    target = {"st": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)], src_data_rank=None), "x": torch.zeros(3)}
    dcp.load(target, storage_reader=HFStorageReader(f"{root}/sharded_tensor"), planner=HFLoadPlanner())
    if local_mismatches({"st": target["st"]}, {"st": full}) or not torch.equal(target["x"], torch.ones(3)):
        bad["sharded_tensor"] = ["st"]
    # A corrupted header fails every rank, naming the file, before any destination changes.
    import shutil

    if rank == 0:
        shutil.copytree(f"{root}/shard0", f"{root}/corrupt")
        victim = sorted(f for f in os.listdir(f"{root}/corrupt") if f.endswith(".safetensors"))[0]
        with open(f"{root}/corrupt/{victim}", "r+b") as f:
            f.seek(8)
            f.write(b"[")
    dist.barrier()
    state = sharded_state("shard0", zeros=True)
    try:
        dcp.load(state, storage_reader=HFStorageReader(f"{root}/corrupt"), planner=HFLoadPlanner())
        bad["corrupt"] = ["no error"]
    except CheckpointException as e:
        if (
            "model-00001-of-" not in str(e)
            or "header is not valid JSON" not in str(e)
            or any(v.to_local().float().abs().sum() != 0 for v in state.values() if v.to_local().numel())
        ):
            bad["corrupt"] = [str(e)[-300:]]
    # A key the checkpoint lacks fails on every rank, before anything is read.
    target = {"st": torch.zeros(8, 6), "absent": torch.zeros(2)} if rank == 0 else {"st": torch.zeros(8, 6)}
    try:
        dcp.load(target, storage_reader=HFStorageReader(f"{root}/sharded_tensor"), planner=HFLoadPlanner())
        bad["missing_key"] = ["no error"]
    except CheckpointException as e:
        if "missing 1 key(s) the state dict needs: 'absent'" not in str(e) or target["st"].any():
            bad["missing_key"] = [str(e)[-300:]]
    return bad


def fused_experts_round_trip(rank, world, src, out_root):
    """Load a per-expert HF checkpoint into fused expert DTensors (experts sharded over ranks,
    and a 2-D mesh that also shards F), compare every local chunk with the reference merge,
    then save it back through the layout."""
    from safetensors.torch import load_file

    from dcp_hf import detect_layout
    from dcp_hf.streaming import hf_specs
    from tests.moe_models import reference_merge

    layout = detect_layout(src)
    specs, _ = layout.memory_specs(hf_specs(HFStorageReader(src)))
    files = load_file(f"{src}/model.safetensors")
    full = {}
    for key, spec in specs.items():
        if key.endswith("experts.gate_up_proj"):
            p = key[: -len("gate_up_proj")]
            n = sum(1 for k in files if k.startswith(p) and k.endswith("gate_proj.weight"))
            e = [[files[f"{p}{i}.{w}_proj.weight"] for i in range(n)] for w in ("gate", "up", "down")]
            full[key], full[p + "down_proj"] = reference_merge(*e, "transformers")
        elif key not in full:
            full[key] = files[key]
    bad = {}
    for kind in ("experts", "2d"):
        mesh = init_device_mesh("cpu", (world,) if kind == "experts" else (2, world // 2))

        def place(k, t, kind=kind):
            if ".experts." not in k:
                return [Replicate()] * mesh.ndim
            return [Shard(0)] if kind == "experts" else [Shard(0), Shard(1 if "gate_up" in k else 2)]

        state = {
            k: distribute_tensor(torch.zeros_like(t), mesh, place(k, t), src_data_rank=None) for k, t in full.items()
        }
        dcp.load(state, storage_reader=HFStorageReader(src), planner=HFLoadPlanner(layout))
        wrong = local_mismatches(state, full)
        if wrong:
            bad[kind] = wrong
        dcp.save(state, storage_writer=HFStorageWriter(f"{out_root}/{kind}"), planner=HFSavePlanner(layout))
    return bad


class FaultyPlanner(HFSavePlanner):
    """Injects a fault on one rank when the writer asks for one key's data."""

    def __init__(self, rank: int, how: str, key: str):
        super().__init__()
        self.fault_rank, self.how, self.key = rank, how, key

    def resolve_data(self, write_item):
        if dist.get_rank() == self.fault_rank and write_item.index.fqn == self.key:
            if self.how == "raise":
                raise RuntimeError(f"injected failure while writing {self.key!r}")
            if self.how == "kill":
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "hang":
                import time

                time.sleep(3600)
        return super().resolve_data(write_item)


def big_state(nbytes: int) -> dict[str, DTensor]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = nbytes // (64 * 4)
    full = torch.arange(rows * 64, dtype=torch.float32).view(rows, 64)
    return {"big": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None), "small": torch.ones(4)}


def save_with_fault(rank, world, path, how, state_bytes, overwrite):
    """Save with a fault injected on rank 1 (``how``: raise, kill, hang, none); report what this
    rank saw: ("ok", seconds) or ("error", message, seconds)."""
    import time

    state = big_state(state_bytes) if state_bytes else sharded_state("shard0")
    key = "big" if state_bytes else "model.embed_tokens.weight"
    t0 = time.monotonic()
    try:
        dcp.save(state, storage_writer=HFStorageWriter(path, overwrite=overwrite), planner=FaultyPlanner(1, how, key))
        return ("ok", time.monotonic() - t0)
    except BaseException as e:  # CheckpointException derives from BaseException
        return ("error", f"{type(e).__name__}: {e}"[-3000:], time.monotonic() - t0)


def load_from_url(rank, world, url, kind, storage_options):
    """Load a remote checkpoint into a zeroed sharded state; return mismatching keys."""
    state = sharded_state(kind, zeros=True)
    dcp.load(state, storage_reader=HFStorageReader(url, storage_options=storage_options), planner=HFLoadPlanner())
    return local_mismatches(state, reference_state())


def save_to_url(rank, world, url, kind, writer_kwargs, storage_options):
    dcp.save(
        sharded_state(kind),
        storage_writer=HFStorageWriter(url, storage_options=storage_options, **writer_kwargs),
        planner=HFSavePlanner(),
    )
    return True


def save_big_to_url(rank, world, url, kind, nbytes, writer_kwargs):
    state = big_state(nbytes)
    if kind == "shard1":
        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(state["big"].numel(), dtype=torch.float32).view(state["big"].shape)
        state["big"] = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
    dcp.save(state, storage_writer=HFStorageWriter(url, **writer_kwargs), planner=HFSavePlanner())
    return True


class ServerKillingPlanner(HFSavePlanner):
    """Stops the S3 server (SIGKILL to its process) when rank 1 resolves its first item."""

    def __init__(self, server_pid: int):
        super().__init__()
        self.server_pid = server_pid

    def resolve_data(self, write_item):
        if dist.get_rank() == 1:
            import os
            import signal

            try:
                os.kill(self.server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return super().resolve_data(write_item)


def save_while_server_dies(rank, world, url, server_pid):
    import time

    t0 = time.monotonic()
    try:
        dcp.save(sharded_state("shard0"), storage_writer=HFStorageWriter(url), planner=ServerKillingPlanner(server_pid))
        return ("ok", "", time.monotonic() - t0)
    except BaseException as e:
        return ("error", f"{type(e).__name__}: {e}"[-2000:], time.monotonic() - t0)


def without_save_id(blob: bytes) -> bytes:
    """A file's bytes with the save's id (in headers and the index) zeroed: two saves of the
    same state are then byte-identical. An index's block digests (which cover the headers, so
    the id) are left out."""
    import json
    import re

    blob = re.sub(rb'("dcp_hf_save_id":\s*")[0-9a-f]{12}"', rb'\g<1>000000000000"', blob)
    if blob.startswith(b"{") and b'"dcp_hf_digests"' in blob:
        index = json.loads(blob)
        index["metadata"].pop("dcp_hf_digests")
        blob = (json.dumps(index, indent=2) + "\n").encode()
    return blob
