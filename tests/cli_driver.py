"""Run several ``dcp-hf`` command lines in one process, so that one ``torchrun`` launch serves
many: ``python -m torch.distributed.run --nproc-per-node 2 tests/cli_driver.py '[[...], ...]'``.
A command that fails prints ``rank R: exit CODE`` (its message is on rank 0's stderr) and the
next one runs."""

import json
import os
import sys

from dcp_hf.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            print(f"rank {os.environ.get('RANK', '0')}: exit {code}", flush=True)
