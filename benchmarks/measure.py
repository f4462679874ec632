"""Measurement helpers: wall time, bytes through read/write syscalls, peak RSS, and the
results table/JSON."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from datetime import datetime, timezone


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measured(fn) -> dict:
    """Run ``fn()`` and return seconds, bytes written/read through syscalls, and the peak
    RSS above the RSS at the start (the peak is reset first via /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    io0 = io_counters()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    io1 = io_counters()
    return {
        "seconds": seconds,
        "written": io1["wchar"] - io0["wchar"],
        "read": io1["rchar"] - io0["rchar"],
        "extra_rss": (_status_kib("VmHWM") - base) * 1024,
    }


def disk_bytes_written(path: str) -> int | None:
    """Bytes the block device holding ``path`` has written so far (/proc/diskstats), or None
    where the device is not listed (e.g. an overlay)."""
    st = os.stat(path)
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if int(p[0]) == os.major(st.st_dev) and int(p[1]) == os.minor(st.st_dev):
                return int(p[9]) * 512
    return None


def rotated(ops: list, r: int) -> list:
    """``ops`` rotated by the repeat ``r``: no op always runs first."""
    return ops[r % len(ops) :] + ops[: r % len(ops)]


def measured_save(fn, out: str, root: str, rank: int) -> dict:
    """``measured(fn)`` of a save into ``out`` by every rank of the default group, ``out``
    removed first and the ranks started together; on rank 0 also ``disk_written``: the bytes
    the disk holding ``root`` wrote, after a sync (not timed) for writers that skip fsync."""
    import shutil

    import torch.distributed as dist

    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    disk0 = disk_bytes_written(root) if rank == 0 else None
    dist.barrier()
    sample = measured(fn)
    dist.barrier()
    if disk0 is not None:
        os.sync()
        sample["disk_written"] = disk_bytes_written(root) - disk0
    return sample


def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def merge_ranks(per_rank: list[dict]) -> dict:
    """One sample over all ranks: the slowest rank's time, summed bytes, the largest RSS."""
    disk = [r["disk_written"] for r in per_rank if r.get("disk_written") is not None]
    return {
        "seconds": max(r["seconds"] for r in per_rank),
        "written": sum(disk) if disk else sum(r["written"] for r in per_rank),
        "read": sum(r["read"] for r in per_rank),
        "extra_rss": max(r["extra_rss"] for r in per_rank),
    }


def summarize(samples: list[dict], nbytes: int) -> dict:
    times = [s["seconds"] for s in samples]
    best = min(samples, key=lambda s: s["seconds"])
    return {
        "min_s": min(times),
        "median_s": statistics.median(times),
        "gbps": nbytes / min(times) / 1e9,
        "gbps_median": nbytes / statistics.median(times) / 1e9,
        "written_ratio": best["written"] / nbytes,
        "read_ratio": best["read"] / nbytes,
        "peak_extra_rss_mib": max(s["extra_rss"] for s in samples) / 2**20,
        "repeats": len(samples),
    }


def machine() -> dict:
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(results: dict, out_dir: str) -> str:
    """Write ``benchmarks/results/<date>-<host>.json``; cases already there from another suite
    run the same day are kept (a case run again replaces its old entry, a planning row its
    layout and rank count)."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = os.path.join(out_dir, f"{stamp}-{socket.gethostname()}.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        fresh = {r["case"] for r in results["results"]}
        planned = {(r["layout"], r["ranks"]) for r in results["planning"]}
        results = {
            **results,
            "results": [r for r in old.get("results", []) if r["case"] not in fresh] + results["results"],
            "planning": sorted(
                [r for r in old.get("planning", []) if (r["layout"], r["ranks"]) not in planned] + results["planning"],
                key=lambda r: (r["layout"], r["ranks"]),
            ),
            "planning_read": results["planning_read"] or old.get("planning_read"),
        }
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path
