"""Tables and plots of a results file: ``python -m benchmarks.report RESULTS.json`` writes the
Markdown report (tables, plots) beside it and prints it."""

from __future__ import annotations

import json
import os
import sys


def case_table(results: list[dict]) -> str:
    """One row per operation of each case; ratio = the operation's best time / ours (> 1: we are
    faster)."""
    rows = [
        "| case | GB | operation | GB/s best | GB/s median | ratio | written/state | read/state | peak extra RSS MiB |",
        "|" + "---|" * 9,
    ]
    for r in results:
        ours = r["ops"].get("ours")
        for name, op in r["ops"].items():
            ratio = f"{op['min_s'] / ours['min_s']:.2f}x" if ours and name != "ours" else "—"
            rows.append(
                f"| {r['case']} | {r['state_bytes'] / 1e9:.2f} | {name} | {op['gbps']:.2f} | {op['gbps_median']:.2f} | {ratio} | "
                f"{op['written_ratio']:.3f} | {op['read_ratio']:.3f} | {op['peak_extra_rss_mib']:.0f} |"
            )
    return "\n".join(rows)


def summary_table(results: list[dict]) -> str:
    """One row per case: ours, and each baseline as ratio (its GB/s)."""
    rows = [
        "| case | GB | ours GB/s (best / median) | baselines: ratio (their GB/s) | peak extra RSS MiB: ours / baselines |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ours = r["ops"].get("ours")
        others = [(n, op) for n, op in r["ops"].items() if n != "ours"]
        if ours is None:
            rows.append(
                f"| {r['case']} | {r['state_bytes'] / 1e9:.2f} | — | "
                + ", ".join(f"{n} {op['gbps']:.2f}" for n, op in others)
                + " | — |"
            )
            continue
        vs = ", ".join(f"{n} **{op['min_s'] / ours['min_s']:.2f}x** ({op['gbps']:.2f})" for n, op in others)
        mem = " / ".join(f"{op['peak_extra_rss_mib']:.0f}" for _, op in others)
        rows.append(
            f"| {r['case']} | {r['state_bytes'] / 1e9:.2f} | {ours['gbps']:.2f} / {ours['gbps_median']:.2f} | {vs} | "
            f"{ours['peak_extra_rss_mib']:.0f} / {mem} |"
        )
    return "\n".join(rows)


def planning_table(rows: list[dict]) -> str:
    out = [
        "| layout | ranks | tensors | chunks | files | local plan s (median / max) | global plan s | "
        "rank's layout s | gathered plans KiB (largest) | scattered plans KiB (largest) |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        out.append(
            f"| {r['layout']} | {r['ranks']} | {r['tensors']} | {r['chunks']} | {r['files']} | "
            f"{r['local_plan_s_median']:.3f} / {r['local_plan_s_max']:.3f} | {r['global_plan_s']:.2f} | "
            f"{r['rank_layout_s']:.2f} | {r['gathered_bytes'] / 1024:.0f} ({r['largest_local_plan_bytes'] / 1024:.1f}) | "
            f"{r['scattered_bytes'] / 1024:.0f} ({r['largest_global_plan_bytes'] / 1024:.1f}) |"
        )
    return "\n".join(out)


def planning_read_text(read: dict) -> str:
    """The load side of the planning case, in words."""
    text = (
        f"Reading the index and all {read['files']} headers ({read['tensors']} tensors, "
        f"{read['header_bytes'] / 2**20:.1f} MiB of headers): index {read['index_s']:.3f} s, "
        f"headers {read['headers_s']:.2f} s."
    )
    lp = read.get("load_plans")
    if lp:
        text += (
            f" Load plans into FSDP2 Shard(0) on {lp['ranks']} ranks (sampled ranks {lp['sampled']}): "
            f"local plan up to {lp['local_plan_s_max']:.2f} s; each rank sends "
            f"{lp['compact_plan_bytes_max'] / 1024:.1f} KiB (DCP's item plan of the same rank: "
            f"{lp['item_plan_bytes_max'] / 2**20:.1f} MiB)."
        )
    return text


def plots(results: list[dict], planning: list[dict], stem: str) -> list[str]:
    """PNG plots beside the results: throughput and peak memory per case and operation, and the
    planning cost against ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cases = [r for r in results if r.get("ops")]
    for field, label, name in (
        ("gbps", "GB/s (best of the repeats)", "throughput"),
        ("peak_extra_rss_mib", "peak extra RSS, MiB (largest rank)", "memory"),
    ):
        if not cases:
            break
        cols = 3
        rows = -(-len(cases) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(15, 1.9 * rows), squeeze=False)
        for ax, r in zip(axes.flat, cases):  # one panel per case: its operations on its own scale
            ops = list(r["ops"])
            values = [max(r["ops"][op][field], 1e-3) for op in ops]
            ax.barh(range(len(ops)), values, color=["black" if op == "ours" else "tab:gray" for op in ops])
            ax.set_yticks(range(len(ops)), ops, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(r["case"], fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.2f}" if field == "gbps" else f" {v:.0f}", va="center", fontsize=6)
            ax.set_xlim(0, max(values) * 1.3)
        for ax in list(axes.flat)[len(cases) :]:
            ax.axis("off")
        fig.suptitle(label, fontsize=10)
        fig.tight_layout()
        paths.append(f"{stem}-{name}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if planning:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for layout in dict.fromkeys(r["layout"] for r in planning):
            rows = [r for r in planning if r["layout"] == layout]
            ranks = [r["ranks"] for r in rows]
            axes[0].plot(ranks, [r["global_plan_s"] for r in rows], "o-", label=layout)
            axes[1].plot(
                ranks, [(r["gathered_bytes"] + r["scattered_bytes"]) / 2**20 for r in rows], "o-", label=layout
            )
            axes[2].plot(ranks, [r["local_plan_s_max"] for r in rows], "o-", label=layout)
        for ax, title in zip(
            axes,
            (
                "global plan, s",
                "plan messages (gathered + scattered), MiB\n(log scale: a slope of one is linear growth)",
                "slowest rank's local plan, s",
            ),
        ):
            ax.set_xscale("log", base=2)
            if "messages" in title:
                ax.set_yscale("log", base=2)
            ax.set_xlabel("ranks")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Save planning, DeepSeek-V3-671B shapes, simulated ranks", fontsize=10)
        fig.tight_layout()
        paths.append(f"{stem}-planning.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(data: dict, json_path: str) -> str:
    """The Markdown report of a results file (tables and plots), written beside it."""
    stem = json_path[: -len(".json")]
    results = [r for r in data.get("results", []) if r.get("ops")]
    planning = data.get("planning", [])
    m = data.get("machine", {})
    lines = [f"# dcp-hf benchmark, {m.get('date', '')} on {m.get('host', '')} ({m.get('cpus', '?')} CPUs)", ""]
    if results:
        lines += [summary_table(results), "", "Every operation:", "", case_table(results), ""]
    if any(r.get("network") for r in results):
        from benchmarks.hosts import network_table

        lines += ["Two hosts, bytes between them (best run):", "", network_table(results), ""]
    if planning:
        lines += ["Planning at scale (simulated ranks):", "", planning_table(planning), ""]
    if data.get("planning_read"):
        lines += [planning_read_text(data["planning_read"]), ""]
    for path in plots(results, planning, stem):
        lines.append(f"![{os.path.basename(path)}]({os.path.basename(path)})")
    text = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(write_report(json.load(f), sys.argv[1]))
