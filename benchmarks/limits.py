"""The physical limits beside the cases: a sequential write + fsync and a read of the same byte
count on the same disk (large writes from one buffer, as ``dd bs=64M conv=fsync`` does), and a
memcpy of the same bytes."""

from __future__ import annotations

import os

import torch

CHUNK = 64 << 20


def _write(path: str, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), CHUNK):
            view = data[start : start + CHUNK]
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str, out: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        for start in range(0, len(out), CHUNK):
            f.readinto(out[start : start + CHUNK])


def run(root: str, size_gb: float, repeat: int, cold: bool = False) -> list[dict]:
    from benchmarks.core import _fill
    from benchmarks.measure import disk_bytes_written, drop_page_cache, measured, summarize

    os.makedirs(root, exist_ok=True)
    nbytes = int(size_gb * 1e9)
    src = _fill(torch.empty(nbytes, dtype=torch.uint8), 0)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    path = os.path.join(root, "limit.bin")
    samples = {"seq_write_fsync": [], "seq_read": [], "memcpy": []}
    for _ in range(repeat):
        disk0 = disk_bytes_written(root)
        sample = measured(lambda: _write(path, memoryview(src.numpy())))
        if disk0 is not None:
            sample["written"] = disk_bytes_written(root) - disk0
        samples["seq_write_fsync"].append(sample)
        if cold:
            drop_page_cache()
        samples["seq_read"].append(measured(lambda: _read(path, memoryview(dst.numpy()))))
        samples["memcpy"].append(measured(lambda: dst.copy_(src)))
        os.unlink(path)
    return [
        {
            "case": "physical limits (same disk, same bytes)",
            "mode": "limits",
            "world": 1,
            "state_bytes": nbytes,
            "ops": {op: summarize(s, nbytes) for op, s in samples.items()},
        }
    ]
