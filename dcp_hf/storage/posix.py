"""Byte-range I/O on a POSIX file system (local disk, NFS, Lustre): positional writes of runs
straight from tensor memory, positional reads straight into it, fsync, atomic renames."""

from __future__ import annotations

import ctypes
import os

import torch

from dcp_hf.boxes import RunGrid
from dcp_hf.errors import CheckpointFormatError


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy; keep ``t`` alive)."""
    if not (t.is_contiguous() and t.device.type == "cpu"):
        raise ValueError("byte_view needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def pread_into(fd: int, out: memoryview, offset: int, file: str) -> None:
    while len(out):
        n = os.preadv(fd, [out], offset)
        if n == 0:
            raise CheckpointFormatError(f"{file}: unexpected end of file at byte {offset}; truncated?")
        out, offset = out[n:], offset + n


def write_runs(fd: int, base: int, grid: RunGrid, src: memoryview) -> None:
    """Write ``src`` (the grid's bytes in order) to its runs at file offset ``base``."""
    n = grid.run_len
    for i, start in enumerate(grid.starts()):
        pwrite_all(fd, src[i * n:(i + 1) * n], base + start)


def read_runs(fd: int, base: int, grid: RunGrid, dst: memoryview, file: str,
              coalesce_gap: int) -> int:
    """Read the grid's runs at file offset ``base`` into ``dst`` in order. Runs of the innermost
    grid dim whose gaps are at most ``coalesce_gap`` bytes, and no longer than the runs (so at
    most twice the needed bytes are read), are read as one span through a bounce buffer.
    Returns the bytes read from the file."""
    n = grid.run_len
    gap = grid.strides[-1] - n if grid.counts else 0
    if grid.counts and grid.counts[-1] > 1 and gap <= min(coalesce_gap, n):
        count, stride = grid.counts[-1], grid.strides[-1]
        outer = RunGrid(grid.start, count * n, grid.counts[:-1], grid.strides[:-1])
        span = (count - 1) * stride + n
        bounce = torch.empty(span, dtype=torch.uint8)
        bounce_view = byte_view(bounce)
        dst_bytes = torch.frombuffer(dst, dtype=torch.uint8)
        for i, start in enumerate(outer.starts()):
            pread_into(fd, bounce_view, base + start, file)
            dst_bytes[i * count * n:(i + 1) * count * n].view(count, n).copy_(
                bounce.as_strided((count, n), (stride, 1)))
        return outer.num_runs * span
    for i, start in enumerate(grid.starts()):
        pread_into(fd, dst[i * n:(i + 1) * n], base + start, file)
    return grid.nbytes


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
