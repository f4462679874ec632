"""Moving bytes between ranks, shared by every storage back end.

A save cuts byte ranges of its files into *parts*, each assembled by one rank (its owner: the
rank holding most of its bytes); the other ranks send the owner their pieces of it over the
process group, in rounds that bound the bytes a rank holds at once. Object stores need this
(a multipart upload takes whole parts); on a file system it turns the short interleaved runs
of column shards into long writes by one rank per range.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcp_hf.boxes import RunGrid, byte_view

MIN_PART = 5 << 20
MAX_PARTS = 10_000


@dataclass(frozen=True)
class Part:
    file: int  # file number
    number: int  # 1-based part number
    lo: int  # byte range [lo, hi) of the file
    hi: int
    owner: int
    round: int


def plan_parts(
    sizes: list[int],
    spans: list[list[tuple[int, int, int]]],
    part_size: int,
    round_bytes: int,
    whole_files: bool = False,
) -> list[Part]:
    """Parts of every file, each owned by the rank whose chunks overlap it most (with
    ``whole_files``: every part of a file by the rank that holds most of the file).

    ``sizes``: file sizes; ``spans[rank]``: (file, lo, hi) byte spans of that rank's chunks.
    Rounds group consecutive parts so that no rank owns more than ``round_bytes`` in one."""
    overlap: dict[tuple[int, int], dict[int, int]] = {}
    widths = [max(part_size, MIN_PART, -(-size // MAX_PARTS)) for size in sizes]
    for rank, rank_spans in enumerate(spans):
        for f, lo, hi in rank_spans:
            w = widths[f]
            for k in range(lo // w, (max(hi, lo + 1) - 1) // w + 1):
                bytes_in = min(hi, (k + 1) * w) - max(lo, k * w)
                cell = overlap.setdefault((f, k), {})
                cell[rank] = cell.get(rank, 0) + max(bytes_in, 0)
    if whole_files:
        for (f, _), votes in list(overlap.items()):
            total = overlap.setdefault((f, -1), {})
            for rank, n in votes.items():
                total[rank] = total.get(rank, 0) + n
    parts, round_no, load = [], 0, {}
    for f, size in enumerate(sizes):
        w = widths[f]
        for k in range(max(1, -(-size // w))):
            lo, hi = k * w, min(size, (k + 1) * w)
            votes = overlap.get((f, -1 if whole_files else k), {0: 0})
            owner = max(sorted(votes), key=lambda r: votes[r])
            if load.get(owner, 0) + (hi - lo) > round_bytes and load:
                round_no, load = round_no + 1, {}
            load[owner] = load.get(owner, 0) + hi - lo
            parts.append(Part(f, k + 1, lo, hi, owner, round_no))
    return parts


@dataclass
class Contribution:
    """One run of bytes destined for a part: file byte offset and the bytes, a view into the
    tensor ``keep`` (held here so the memory outlives the view)."""

    file: int
    offset: int
    data: memoryview
    keep: torch.Tensor


def clip_runs(file: int, base: int, grid: RunGrid, tensor: torch.Tensor, lo: int, hi: int):
    """The pieces of the grid's runs (at file offset ``base``; bytes from the contiguous
    ``tensor``) that fall inside [lo, hi)."""
    n = grid.run_len
    src = byte_view(tensor)
    span_lo, span_hi = grid.span()
    if base + span_hi <= lo or base + span_lo >= hi or n == 0:
        return
    for i, start in enumerate(grid.starts()):
        a, b = max(base + start, lo), min(base + start + n, hi)
        if a < b:
            s = i * n + a - (base + start)
            yield Contribution(file, a, src[s : s + b - a], tensor)


def exchange(outgoing: dict[int, list[Contribution]], group, world: int) -> list[Contribution]:
    """Send each owner its contributions; return those sent to this rank (one all-to-all for
    the sizes, one for (file, offset, length) triples, one for the bytes)."""
    meta_out, data_out, counts = [], [], torch.zeros(world, 2, dtype=torch.int64)
    for rank in range(world):
        items = outgoing.get(rank, [])
        counts[rank, 0] = 3 * len(items)
        counts[rank, 1] = sum(len(c.data) for c in items)
        meta_out += [v for c in items for v in (c.file, c.offset, len(c.data))]
        data_out += [c.data for c in items]
    counts_in = torch.empty_like(counts)
    dist.all_to_all_single(counts_in, counts, group=group)
    meta_in = torch.empty(int(counts_in[:, 0].sum()), dtype=torch.int64)
    dist.all_to_all_single(
        meta_in, torch.tensor(meta_out, dtype=torch.int64), counts_in[:, 0].tolist(), counts[:, 0].tolist(), group=group
    )
    data_send = torch.empty(int(counts[:, 1].sum()), dtype=torch.uint8)
    at = 0
    view = byte_view(data_send)
    for chunk in data_out:
        view[at : at + len(chunk)] = chunk
        at += len(chunk)
    data_in = torch.empty(int(counts_in[:, 1].sum()), dtype=torch.uint8)
    dist.all_to_all_single(data_in, data_send, counts_in[:, 1].tolist(), counts[:, 1].tolist(), group=group)
    received, at, triples = [], 0, meta_in.view(-1, 3).tolist()
    data_view = byte_view(data_in)
    for f, off, n in triples:
        received.append(Contribution(f, off, data_view[at : at + n], data_in))
        at += n
    return received


def assemble(part: Part, header: bytes, pieces: list[Contribution]) -> bytearray:
    """The part's bytes from the header and the pieces; every byte must be covered once (the
    copy is needed: botocore sends bytes, not views)."""
    buf = bytearray(part.hi - part.lo)
    view = memoryview(buf)
    filled = 0
    if part.lo < len(header):
        n = min(len(header), part.hi) - part.lo
        view[:n] = header[part.lo : part.lo + n]
        filled += n
    for c in pieces:
        view[c.offset - part.lo : c.offset - part.lo + len(c.data)] = c.data
        filled += len(c.data)
    if filled != len(buf):
        raise RuntimeError(
            f"part {part.number} of file {part.file}: {filled} of {len(buf)} bytes "
            f"arrived; not uploading an incomplete part"
        )
    return buf


def part_of(parts_by_file: dict[int, list[Part]], file: int, offset: int) -> Part:
    parts = parts_by_file[file]
    return parts[bisect.bisect_right([p.lo for p in parts], offset) - 1]


def exchange_bytes(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], recv: torch.Tensor, group):
    """One all-to-all of bytes whose sizes both sides already know from a plan they share
    (loads: ``storage.shared_reads``); ``send`` and ``recv`` hold each rank's segment, in rank
    order."""
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
