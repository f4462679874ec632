"""The exchange's byte bookkeeping, against byte positions computed independently with torch:
clipping a box's runs to a byte range, and parts assembled from the pieces of every chunk."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_hf.boxes import box_runs
from dcp_hf.storage.exchange import Holding, PartIndex, Region, assemble, pieces_in, plan_parts
from tests.strategies import shape_and_box


def _box(t, offsets, sizes):
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, n)
    return t


def byte_positions(shape, offsets, sizes, width):
    """The tensor-relative byte position of every byte of the box, in the box's own order."""
    positions = torch.arange(torch.Size(shape).numel() * width, dtype=torch.int64).view(*shape, width)
    return _box(positions, offsets, sizes).reshape(-1)


@settings(max_examples=300, deadline=None)
@given(shape_and_box(min_dims=0, max_dims=4, max_size=6), st.sampled_from([1, 2, 4]), st.data())
def test_clip_keeps_exactly_the_bytes_in_range(case, width, data):
    shape, offsets, sizes = case
    total = torch.Size(shape).numel() * width
    lo = data.draw(st.integers(0, total))
    hi = data.draw(st.integers(lo, total))
    grid = box_runs(shape, offsets, sizes, width)
    positions = byte_positions(shape, offsets, sizes, width)
    want = {(i, int(p)) for i, p in enumerate(positions.tolist()) if lo <= p < hi}
    got = []
    for g, at in grid.clip(lo, hi):
        for j, p in enumerate(s + k for s in g.starts() for k in range(g.run_len)):
            got.append((at + j, p))
    assert len(got) == len(set(got)) and set(got) == want
    assert len(grid.clip(lo, hi)) <= 2 * len(grid.counts) + 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 7), min_size=1, max_size=3),
    st.integers(1, 4),
    st.integers(1, 64),
    st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]),
)
def test_parts_assembled_from_column_chunks_are_the_file_bytes(shape, ranks, width, dtype):
    """Chunks split along the last dim over ``ranks`` ranks (short interleaved runs); parts of
    ``width`` bytes owned by whoever plan_parts picks; every part assembled from every rank's
    pieces must equal the tensor's bytes at that place of the file."""
    shape = tuple(shape)
    full = torch.randint(0, 255, shape, dtype=torch.int64).to(dtype)
    base, item = 11, full.element_size()  # an odd header size
    file_bytes = bytes(11) + full.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    last = shape[-1]
    cuts = [last * r // ranks for r in range(ranks + 1)]
    chunks = []
    for r in range(ranks):
        if cuts[r + 1] == cuts[r]:
            continue
        offsets = (0,) * (len(shape) - 1) + (cuts[r],)
        sizes = shape[:-1] + (cuts[r + 1] - cuts[r],)
        grid = box_runs(shape, offsets, sizes, item)
        chunks.append((r, grid, _box(full, offsets, sizes).contiguous()))
    holdings = [Holding(r, 0, base + g.span()[0], base + g.span()[1], g.nbytes) for r, g, _ in chunks]
    parts = plan_parts([Region(0, base, len(file_bytes), width)], holdings, round_bytes=3 * width)
    assert [p.lo for p in parts] == list(range(base, len(file_bytes), width))
    index = PartIndex(parts)
    for part in parts:
        pieces = [p for _, g, t in chunks for p in pieces_in(0, base, g, t, part.lo, part.hi)]
        assert all(index.of(0, p.offset) == part for p in pieces)
        assert assemble(part, b"", pieces).numpy().tobytes() == file_bytes[part.lo : part.hi]


def test_column_parts_are_shared_by_the_ranks():
    """Ranks holding equal shares of every part (column shards) own about equal numbers of parts."""
    shape, ranks = (64, 32), 4
    holdings = []
    for r in range(ranks):
        g = box_runs(shape, (0, 8 * r), (64, 8), 2)
        holdings.append(Holding(r, 0, g.span()[0], g.span()[1], g.nbytes))
    parts = plan_parts([Region(0, 0, 64 * 32 * 2, 256)], holdings, round_bytes=1 << 20)
    owners = [p.owner for p in parts]
    assert sorted(owners.count(r) for r in range(ranks)) == [4, 4, 4, 4]
