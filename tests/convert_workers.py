"""Run under torchrun: ``hf_to_dcp SRC DST [FAIL_RANK]`` with gloo; rank FAIL_RANK's reads of
the source fail (an injected disk error, after the output files were created). Each rank
prints ``rank R: ok`` or ``rank R: ErrorType: message``."""

import os
import sys

import torch.distributed as dist

from dcp_hf import convert


def main(src: str, dst: str, fail_rank: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == fail_rank:

        def broken(*args, **kwargs):
            raise OSError(5, "injected read error")

        convert.StreamingSavePlanner.fetch = broken
    try:
        convert.hf_to_dcp(src, dst)
        print(f"rank {rank}: ok", flush=True)
    except Exception as e:  # noqa: BLE001 - reported for the test
        print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
    os._exit(0)
