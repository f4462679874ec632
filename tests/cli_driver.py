"""Run several ``dcp-hf`` command lines in one process, so that one ``torchrun`` launch serves
many: ``python -m torch.distributed.run --nproc-per-node 2 tests/cli_driver.py '[[...], ...]'``."""

import json
import sys

from dcp_hf.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        main(argv)
