"""The ``dcp-hf`` command line driven by the tests.

``run_cli(ARGS)`` runs ``python -m dcp_hf ARGS`` as a process, as a user's terminal would.

As a script, this file runs several ``dcp-hf`` command lines in one process, so that one
``torchrun`` launch serves many: ``python -m torch.distributed.run --nproc-per-node 2
tests/cli_driver.py '[[...], ...]'``. A command that fails prints ``rank R: exit CODE`` (its
message is on rank 0's stderr) and the next one runs."""

import json
import os
import subprocess
import sys


def run_cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m dcp_hf ARGS`` as a process; its stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "dcp_hf", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


if __name__ == "__main__":
    from dcp_hf.cli import main

    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            print(f"rank {os.environ.get('RANK', '0')}: exit {code}", flush=True)
