"""python -m benchmarks [core] [--size-gb 2] [--repeat 3] [--cold] [--dir DIR]

Runs each case with ours and its baselines side by side in one run, prints a table with
ratios (baseline time / our time: > 1 means we are faster) and writes
benchmarks/results/<date>-<host>.json. "written/state" is what the disk wrote (from
/proc/diskstats, after a sync) over the state's bytes; "read/state" is bytes through read
syscalls or touched mappings; peak extra RSS is the peak above the RSS before the operation.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks import core, layouts, megatron, s3
from benchmarks.measure import machine, write_results


def table(results: list[dict]) -> str:
    rows = ["| case | ours GB/s | baseline | baseline GB/s | ratio | written/state | read/state | "
            "peak extra RSS MiB (ours / baseline) |", "|" + "---|" * 8]
    for r in results:
        ours = r["ops"]["ours"]
        for name, base in r["ops"].items():
            if name == "ours":
                continue
            rows.append(
                f"| {r['case']} | {ours['gbps']:.2f} | {name} | {base['gbps']:.2f} | "
                f"{base['min_s'] / ours['min_s']:.2f}x | {ours['written_ratio']:.3f} / "
                f"{base['written_ratio']:.3f} | {ours['read_ratio']:.3f} | "
                f"{ours['peak_extra_rss_mib']:.0f} / {base['peak_extra_rss_mib']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", nargs="?", default="all", choices=["all", "core", "layouts", "megatron", "s3"])
    parser.add_argument("--size-gb", type=float, default=2.0, help="state size (default 2 GB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--expert-layers", type=int, default=4, help="layers of the experts case")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each load")
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="dcp-hf-bench-", dir=args.dir)
    print(f"dcp-hf benchmark '{args.suite}': {args.size_gb} GB bf16 state, {args.repeat} repeats, "
          f"scratch {root}")
    results = []
    if args.suite in ("all", "core"):
        results += core.run(os.path.join(root, "core"), args.size_gb, args.repeat, args.cold)
    if args.suite in ("all", "layouts"):
        results += layouts.run(os.path.join(root, "layouts"), args.repeat, layers=args.expert_layers)
    if args.suite in ("all", "megatron"):
        results += megatron.run(os.path.join(root, "megatron"), args.repeat, size_gb=min(args.size_gb, 1.5))
    if args.suite in ("all", "s3"):
        results += s3.run(os.path.join(root, "s3"), args.repeat, size_gb=min(args.size_gb, 1.0))
    print(table(results))
    path = write_results({"machine": machine(), "suite": args.suite, "size_gb": args.size_gb,
                          "cold": args.cold, "results": results}, args.out)
    print(f"results: {path} (all cases of the day: python -m benchmarks.report {path})")


if __name__ == "__main__":
    main()
