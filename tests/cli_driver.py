"""Run several ``dcp-hf`` command lines in one process, so that one ``torchrun`` launch serves
many: ``python -m torch.distributed.run --nproc-per-node 2 tests/cli_driver.py '[[...], ...]'``.
A command that exits with a message prints it as ``rank R: message`` and the next one runs."""

import json
import os
import sys

from dcp_hf.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        try:
            main(argv)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            print(f"rank {os.environ.get('RANK', '0')}: {e.code}", flush=True)
