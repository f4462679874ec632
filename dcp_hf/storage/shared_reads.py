"""Loads that read each byte once: the mirror of the save side's parts.

A rank whose boxes lie in short runs (the rows of a ``Shard(1)`` chunk, a 2-D mesh's tiles)
would read, on its own, either many small pieces or whole spans that mostly hold the other
ranks' columns. Instead every rank describes those boxes (:class:`Need`), and all ranks compute
the same plan: each tensor's rows (dim 0) are cut into *bands* of about ``band_bytes``, each
band is read by one rank (its owner: the rank that needs most of it, then the least loaded)
with one long read, and the owner sends every other rank exactly its sub-box of the band. The
bands go in rounds, so a rank holds at most about ``round_bytes`` at once. Since every rank
knows the whole plan, sizes are never exchanged: one all-to-all of bytes per round.

Call order on every rank of the group (all ranks call it, with empty needs where they have
none): :func:`plan_bands` on the gathered needs, then :func:`read_bands`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcp_hf.boxes import byte_view
from dcp_hf.storage.exchange import SharedMemory

ALIGN = 8  # pieces sit at multiples of the largest item size in the exchanged buffers


@dataclass(frozen=True)
class Need:
    """One box a rank loads from a stored tensor (offsets and lengths in elements)."""

    key: str
    file: str
    start: int  # byte offset of the tensor's data in its file (the same on every rank)
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def rows_bytes(self, rows: int) -> int:
        """Bytes of this box in ``rows`` of its rows."""
        return rows * math.prod(self.lengths[1:]) * self.dtype.itemsize


@dataclass(frozen=True)
class BandPiece:
    """Rows [r0, r1) (of the stored tensor) of need number ``index`` of ``rank``."""

    rank: int
    index: int
    r0: int
    r1: int


@dataclass(frozen=True)
class Band:
    """Rows [r0, r1) of a stored tensor, read whole by ``owner`` in round ``round``."""

    need: Need  # the tensor's key, file, offset, shape and dtype (its box is one rank's)
    r0: int
    r1: int
    owner: int
    round: int
    pieces: tuple[BandPiece, ...]

    @property
    def offset(self) -> int:
        return self.need.start + self.r0 * self.need.row_bytes

    @property
    def nbytes(self) -> int:
        return (self.r1 - self.r0) * self.need.row_bytes


@dataclass(frozen=True)
class BandPlan:
    bands: list[Band]
    shared: list[set[int]]  # per rank: the indices of its needs the bands deliver
    rounds: int


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _row_spans(needs: list[Need]) -> list[tuple[int, int]]:
    """The union of the needs' row ranges, as sorted disjoint [lo, hi) spans."""
    spans: list[list[int]] = []
    for lo, hi in sorted((n.offsets[0], n.offsets[0] + n.lengths[0]) for n in needs):
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return [(lo, hi) for lo, hi in spans]


def plan_bands(needs: list[list[Need]], band_bytes: int, round_bytes: int, max_waste: float = 1.25) -> BandPlan:
    """The same plan on every rank from everyone's needs (``needs[rank]``). A tensor is read in
    bands when reading its needed rows whole costs at most ``max_waste`` times the bytes the
    ranks need of it (distinct boxes); otherwise its needs stay with their ranks."""
    by_key: dict[str, list[tuple[int, int, Need]]] = {}
    for rank, rank_needs in enumerate(needs):
        for index, need in enumerate(rank_needs):
            by_key.setdefault(need.key, []).append((rank, index, need))
    bands: list[Band] = []
    shared: list[set[int]] = [set() for _ in needs]
    load = [0] * len(needs)  # bytes each rank reads, for balance
    for key in sorted(by_key):
        entries = by_key[key]
        first = entries[0][2]
        row_bytes = first.row_bytes
        spans = _row_spans([n for _, _, n in entries])
        distinct = {(n.offsets, n.lengths): n for _, _, n in entries}
        needed = sum(math.prod(n.lengths) * n.dtype.itemsize for n in distinct.values())
        whole = sum(hi - lo for lo, hi in spans) * row_bytes
        if not row_bytes or row_bytes > round_bytes or whole > max_waste * needed:
            continue
        step = max(1, band_bytes // row_bytes)
        for lo, hi in spans:
            for r0 in range(lo, hi, step):
                r1 = min(hi, r0 + step)
                pieces, votes = [], {}
                for rank, index, n in entries:
                    a, b = max(r0, n.offsets[0]), min(r1, n.offsets[0] + n.lengths[0])
                    if a < b:
                        pieces.append(BandPiece(rank, index, a, b))
                        votes[rank] = votes.get(rank, 0) + n.rows_bytes(b - a)
                owner = min(votes, key=lambda r: (-votes[r], load[r], r))
                load[owner] += (r1 - r0) * row_bytes
                bands.append(Band(first, r0, r1, owner, 0, tuple(pieces)))
        for rank, index, _ in entries:
            shared[rank].add(index)
    bands, rounds = _rounds(bands, needs, round_bytes)
    return BandPlan(bands, shared, rounds)


def _rounds(bands: list[Band], needs: list[list[Need]], round_bytes: int) -> tuple[list[Band], int]:
    """Number the bands' rounds: a new round when a rank would hold more than ``round_bytes``
    (the bands it reads, what it sends of them, what it receives)."""
    held = [0] * len(needs)
    out, round_no = [], 0
    if not bands:
        return [], 0
    for band in bands:
        add = [0] * len(needs)
        add[band.owner] += band.nbytes
        for p in band.pieces:
            if p.rank != band.owner:
                n = _padded(needs[p.rank][p.index].rows_bytes(p.r1 - p.r0))
                add[band.owner] += n
                add[p.rank] += n
        if any(held) and any(h + a > round_bytes for h, a in zip(held, add)):
            round_no, held = round_no + 1, [0] * len(needs)
        held = [h + a for h, a in zip(held, add)]
        out.append(Band(band.need, band.r0, band.r1, band.owner, round_no, band.pieces))
    return out, round_no + 1


def _band_box(rows: torch.Tensor, band: Band, need: Need, p: BandPiece) -> torch.Tensor:
    """Piece ``p`` of ``need`` inside a band's rows (which span the stored tensor's width)."""
    t = rows[p.r0 - band.r0 : p.r1 - band.r0]
    for d in range(1, len(need.shape)):
        t = t.narrow(d, need.offsets[d], need.lengths[d])
    return t


def _dest_rows(dest: torch.Tensor, need: Need, p: BandPiece) -> torch.Tensor:
    return dest[p.r0 - need.offsets[0] : p.r1 - need.offsets[0]]


def segment_sizes(plan: BandPlan, world: int) -> list[int]:
    """Per rank: the largest sum of the bands it owns in one round (its shared segment)."""
    sizes = [[0] * plan.rounds for _ in range(world)]
    for b in plan.bands:
        sizes[b.owner][b.round] += _padded(b.nbytes)
    return [max(s, default=0) for s in sizes]


def read_bands(
    plan: BandPlan,
    needs: list[list[Need]],
    me: int,
    dests: dict[int, torch.Tensor],
    read: Callable[[Band, memoryview], int],
    run: Callable[[list[Callable[[], int]]], list[int]],
    exchange: Callable[[torch.Tensor, list[int], list[int], torch.Tensor], None],
    barrier: Callable[[], None],
    shared: SharedMemory | None = None,
) -> int:
    """Deliver this rank's shared needs into ``dests`` (need index -> destination of the
    box's shape, any dtype the stored one casts to). ``read(band, out)`` reads a band's bytes,
    ``run(tasks)`` runs tasks (concurrently), ``exchange(send, send_sizes, recv_sizes, recv)`` is
    the all-to-all, used unless the ranks share memory (``shared``: then ``barrier``
    separates the rounds). Returns the bytes this rank read. Every rank must call it with the
    same plan: on a failure it raises only after the last round, having taken part in all."""
    world, nread, failure = len(needs), 0, None
    local = threading.local()  # each thread's band buffer, reused (fresh pages cost faults)
    buffers: dict[str, torch.Tensor] = {}  # the send and receive buffers, reused

    def reused(name: str, n: int) -> torch.Tensor:
        if name not in buffers or buffers[name].numel() < n:
            buffers[name] = torch.empty(n, dtype=torch.uint8)
        return buffers[name][:n]

    def band_rows(buf: torch.Tensor, band: Band) -> torch.Tensor:
        return buf.view(band.need.dtype).view((band.r1 - band.r0,) + tuple(band.need.shape[1:]))

    for round_no in range(plan.rounds):
        bands = [b for b in plan.bands if b.round == round_no]
        at_in_segment, segment_end = {}, [0] * world
        for band in bands:
            at_in_segment[band] = segment_end[band.owner]
            segment_end[band.owner] += _padded(band.nbytes)
        send_sizes, recv_sizes = [0] * world, [0] * world
        send_at: dict[BandPiece, int] = {}  # offset in the rank's segment
        recvs: list[tuple[Band, BandPiece, int]] = []  # (band, piece, offset in the owner's segment)
        for band in bands:
            for p in band.pieces:
                n = _padded(needs[p.rank][p.index].rows_bytes(p.r1 - p.r0))
                if band.owner == me and p.rank != me:
                    send_at[p] = send_sizes[p.rank]
                    send_sizes[p.rank] += 0 if shared else n
                elif p.rank == me and band.owner != me:
                    recvs.append((band, p, recv_sizes[band.owner]))
                    recv_sizes[band.owner] += 0 if shared else n
        send_base = [sum(send_sizes[:r]) for r in range(world)]
        send = reused("send", sum(send_sizes))

        def take(band: Band) -> int:
            """Read a band; copy this rank's pieces to their destinations, the others' to the
            send buffer (or leave them in the shared segment)."""
            if shared is not None:
                at = at_in_segment[band]
                buf = torch.frombuffer(shared.own, dtype=torch.uint8, count=band.nbytes, offset=at)
            else:
                if getattr(local, "buf", None) is None or local.buf.numel() < band.nbytes:
                    local.buf = torch.empty(band.nbytes, dtype=torch.uint8)
                buf = local.buf[: band.nbytes]
            got = read(band, byte_view(buf))
            rows = band_rows(buf, band)
            dtype = band.need.dtype
            for p in band.pieces:
                need = needs[p.rank][p.index]
                src = _band_box(rows, band, need, p)
                if p.rank == me:
                    _dest_rows(dests[p.index], need, p).copy_(src)
                elif shared is None:
                    at = send_base[p.rank] + send_at[p]
                    send[at : at + src.numel() * dtype.itemsize].view(dtype).view(src.shape).copy_(src)
            return got

        if failure is None:
            try:
                nread += sum(run([lambda b=b: take(b) for b in bands if b.owner == me]))
            except Exception as e:  # noqa: BLE001 - raised after the last round
                failure = e
        if not any(p.rank != b.owner for b in bands for p in b.pieces):
            continue  # no rank needs another's band this round (every rank knows it)
        if shared is not None:
            barrier()  # every owner's bands of the round are in its segment
            recv = None
        else:
            recv = reused("recv", sum(recv_sizes))
            exchange(send, send_sizes, recv_sizes, recv)
        recv_base = [sum(recv_sizes[:r]) for r in range(world)]

        def place(band: Band, p: BandPiece, at: int) -> int:
            need = needs[me][p.index]
            dest = _dest_rows(dests[p.index], need, p)
            if shared is not None:
                segment = shared.segments[band.owner]
                off = at_in_segment[band]
                dest.copy_(_band_box(band_rows(segment[off : off + band.nbytes], band), band, need, p))
            else:
                at += recv_base[band.owner]
                dest.copy_(recv[at : at + need.rows_bytes(p.r1 - p.r0)].view(need.dtype).view(dest.shape))
            return 0

        if failure is None:
            try:
                run([lambda r=r: place(*r) for r in recvs])
            except Exception as e:  # noqa: BLE001
                failure = e
        if shared is not None:
            barrier()  # every rank has copied its pieces: the segments may be reused
    if failure is not None:
        raise failure
    return nread
