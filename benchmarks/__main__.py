"""python -m benchmarks [all|core|limits|layouts|megatron|s3|quantized|training|digests|planning|device] [--size-gb G] [--repeat N]

Runs each case with ours and its baselines side by side in one run (same state, same
processes, alternating), prints a table with ratios (baseline time / our time: > 1 means we
are faster) and writes benchmarks/results/<date>-<host>.json, a Markdown report beside it and
PNG plots. "written/state" is what the disk wrote (from /proc/diskstats, after a sync) over the
state's bytes; "read/state" is bytes through read syscalls or touched mappings; peak extra RSS
is the peak above the RSS before the operation (largest rank). The default run ("all" at the
default sizes) takes about 9 minutes on 2 cores; "planning --ranks 64,128,256,512,1024" is the
full simulation at scale. "device" (CUDA state dicts at 4 GB or more, see benchmarks/device.py) needs a GPU;
"all" includes it only where one is present.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.measure import machine, write_results
from benchmarks.report import case_table, planning_read_text, planning_table, write_report

SUITES = [
    "core",
    "limits",
    "layouts",
    "megatron",
    "s3",
    "quantized",
    "training",
    "digests",
    "planning",
    "hosts",
    "device",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suite", nargs="?", default="all", choices=["all"] + SUITES)
    parser.add_argument(
        "--size-gb",
        type=float,
        default=0.5,
        help="state size of the core and limits cases (default 0.5 GB); Megatron uses "
        "half of it (at most 1.5 GB), S3 half of it from 0.5 GB to 1 GB",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--expert-layers", type=int, default=4, help="layers of the experts case")
    parser.add_argument("--ranks", default="64", help="simulated ranks of the planning case")
    parser.add_argument(
        "--only", default=None, help="run only the core/limits cases whose name contains this (e.g. 'load')"
    )
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each load")
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    import torch

    from benchmarks import core, device, digests, hosts, layouts, limits, megatron, planning, quantized, s3, training

    if args.suite == "device" and not torch.cuda.is_available():
        parser.exit(1, "python -m benchmarks device: no CUDA device here; see python -m benchmarks.device --cpu\n")

    root = tempfile.mkdtemp(prefix="dcp-hf-bench-", dir=args.dir)
    print(f"dcp-hf benchmark '{args.suite}': {args.size_gb} GB, {args.repeat} repeats, scratch {root}")
    wanted = [s for s in SUITES if s != "device" or torch.cuda.is_available()] if args.suite == "all" else [args.suite]
    results, plans, headers = [], [], None
    suites = {
        "core": lambda: core.run(os.path.join(root, "core"), args.size_gb, args.repeat, args.cold, args.only),
        "limits": lambda: limits.run(os.path.join(root, "limits"), args.size_gb, args.repeat, args.cold),
        "layouts": lambda: layouts.run(os.path.join(root, "layouts"), args.repeat, layers=args.expert_layers),
        "megatron": lambda: megatron.run(
            os.path.join(root, "megatron"), args.repeat, size_gb=min(args.size_gb / 2, 1.5)
        ),
        "s3": lambda: s3.run(os.path.join(root, "s3"), args.repeat, size_gb=min(max(args.size_gb / 2, 0.5), 1.0)),
        "quantized": lambda: quantized.run(os.path.join(root, "quantized"), args.repeat, size_gb=args.size_gb / 2),
        "hosts": lambda: hosts.run(os.path.join(root, "hosts"), args.size_gb, args.repeat),
        "training": lambda: training.run(os.path.join(root, "training"), args.size_gb / 2, args.repeat),
        "digests": lambda: digests.run(os.path.join(root, "digests"), args.size_gb, args.repeat),
        "device": lambda: device.run(os.path.join(root, "device"), max(args.size_gb, 4.0), args.repeat),
    }
    for name in wanted:
        t0 = time.perf_counter()
        if name == "planning":
            plans, headers = planning.run(os.path.join(root, "planning"), tuple(int(r) for r in args.ranks.split(",")))
        else:
            results += suites[name]()
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if results:
        print(case_table(results))
    if plans:
        print(planning_table(plans))
        print(planning_read_text(headers))
    path = write_results(
        {
            "machine": machine(),
            "suite": args.suite,
            "size_gb": args.size_gb,
            "cold": args.cold,
            "results": results,
            "planning": plans,
            "planning_read": headers,
        },
        args.out,
    )
    with open(path) as f:
        import json

        write_report(json.load(f), path)
    print(f"results: {path}, report: {path[:-5]}.md")


if __name__ == "__main__":
    main()
