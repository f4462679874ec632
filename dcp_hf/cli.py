"""The ``dcp-hf`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    from dcp_hf.demo import run_demo
    from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape
    shape = LLAMA_1B_LIKE if args.size == "1b" else LlamaShape()
    run_demo(args.output, args.nproc, shape, args.max_shard_size)
    return 0


def _cmd_inspect(args) -> int:
    from dcp_hf.inspect import inspect_checkpoint
    print(inspect_checkpoint(args.path, verbose=args.verbose))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="save a sharded Llama-shaped model as an HF checkpoint in "
                                       "local processes, reload it resharded, verify, print GB/s")
    demo.add_argument("--output", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument("--nproc", type=int, default=2, help="processes (default: %(default)s)")
    demo.add_argument("--size", choices=["small", "1b"], default="small",
                      help="small: ~50 MB; 1b: Llama-1B-like, ~2 GB (default: %(default)s)")
    demo.add_argument("--max-shard-size", default="20MB", help="largest file (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    insp = sub.add_parser("inspect", help="list the tensors of a checkpoint from its headers")
    insp.add_argument("path")
    insp.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    insp.set_defaults(func=_cmd_inspect)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
