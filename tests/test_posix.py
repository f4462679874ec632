"""POSIX byte-range I/O: every box of a tensor written and read back through both paths
(positional writes/reads and strided copies through a mapping)."""

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_hf.boxes import box_runs
from dcp_hf.storage import posix
from tests.strategies import shape_and_box


def tensor_and_box():
    dtypes = st.sampled_from([torch.uint8, torch.bfloat16, torch.float32, torch.int64])
    return st.tuples(shape_and_box(min_dims=1, max_dims=3, max_size=9), dtypes).map(lambda t: (*t[0], t[1]))


def _box(t, offsets, sizes):
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, n)
    return t


@settings(max_examples=150, deadline=None)
@given(tensor_and_box(), st.sampled_from([0, 1 << 20]))
def test_write_then_read_any_box_through_both_paths(tmp_path_factory, case, small_run):
    shape, offsets, sizes, dtype = case
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.int64).view(shape).to(dtype)
    chunk = _box(full, offsets, sizes).contiguous()
    width = chunk.element_size()
    grid = box_runs(shape, offsets, sizes, width)
    path = tmp_path_factory.mktemp("posix") / "f"
    base = 13  # an unaligned tensor start, as after an odd-sized header
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    old = posix.SMALL_RUN
    posix.SMALL_RUN = small_run  # 0: every run by pwrite; 1 MiB: strided runs through a mapping
    try:
        os.pwrite(fd, b"\xff" * (base + full.numel() * width), 0)
        posix.write_runs(fd, base, grid, posix.byte_view(chunk))
        on_disk = (
            torch.frombuffer(bytearray(os.pread(fd, full.numel() * width, base)), dtype=torch.uint8)
            .view(dtype)
            .view(shape)
        )
        assert torch.equal(_box(on_disk, offsets, sizes), chunk)
        out = torch.zeros_like(chunk)
        posix.read_runs(fd, base, grid, posix.byte_view(out), str(path))
        assert torch.equal(out, chunk)
    finally:
        posix.SMALL_RUN = old
        os.close(fd)
