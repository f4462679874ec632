"""Run under torchrun with gloo: ``SRC DST [FAIL_RANK]``: ``hf_to_dcp``, where rank FAIL_RANK's
reads of the source fail (an injected disk error, after the output files were created);
``save DST``: ``dcp.save`` of a small state dict with HFStorageWriter(DST). Each rank prints
``rank R: ok`` or ``rank R: ErrorType: message`` (DCP's wrapper taken off); ``tied HF_DIR``:
loads HF_DIR (one tensor ``embed``, 8 x 4) into a DTensor state dict where ``head`` is the same
DTensor, then where it is a DTensor of its own; prints ``rank R: tied ok|ErrorType``."""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dcp_hf import HFSavePlanner, HFStorageWriter, convert, streaming
from dcp_hf.errors import root_cause


def main(src: str, dst: str, fail_rank: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == fail_rank:

        def broken(*args, **kwargs):
            raise OSError(5, "injected read error")

        streaming.StreamingSavePlanner.fetch = broken
    if src == "tied":
        _tied(dst, rank)
        dist.destroy_process_group()
        return
    try:
        if src == "save":
            dcp.save({f"t{rank}": torch.ones(4)}, storage_writer=HFStorageWriter(dst), planner=HFSavePlanner())
        else:
            convert.hf_to_dcp(src, dst)
        print(f"rank {rank}: ok", flush=True)
    except BaseException as e:  # noqa: BLE001 - reported for the test
        e = root_cause(e)
        print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
    finally:
        dist.destroy_process_group()


def _tied(path: str, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dcp_hf import HFLoadPlanner, HFStorageReader

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    embed = distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)])
    for name, head in [("same", embed), ("own", distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]))]:
        try:
            dcp.load({"embed": embed, "head": head}, storage_reader=HFStorageReader(path), planner=HFLoadPlanner())
            want = torch.arange(32.0).view(8, 4)
            print(f"rank {rank}: {name} ok {torch.equal(embed.full_tensor(), want)}", flush=True)
        except BaseException as e:  # noqa: BLE001 - reported for the test
            print(f"rank {rank}: {name} {type(root_cause(e)).__name__}: {root_cause(e)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
    os._exit(0)
