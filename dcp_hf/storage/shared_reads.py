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

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcp_hf.boxes import byte_view
from dcp_hf.storage.exchange import Rounds, SharedMemory

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
                pieces: list[BandPiece] = []
                votes: dict[int, int] = {}
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


def segment_sizes(plan: BandPlan, needs: list[list[Need]]) -> list[int]:
    """Per rank: the most bytes it holds for others in one round, its shared segment: the bands
    it owns, then the pieces it receives for its host (at most its own pieces of other ranks'
    bands)."""
    world = len(needs)
    sizes = [[0] * plan.rounds for _ in range(world)]
    for b in plan.bands:
        sizes[b.owner][b.round] += _padded(b.nbytes)
        for p in b.pieces:
            if p.rank != b.owner:
                sizes[p.rank][b.round] += _padded(needs[p.rank][p.index].rows_bytes(p.r1 - p.r0))
    return [max(s, default=0) for s in sizes]


@dataclass(frozen=True)
class BandsRead:
    """What :func:`read_bands` moved on this rank: bytes read from storage, bytes received
    over the process group (from other hosts)."""

    read: int
    from_other_hosts: int


@dataclass(frozen=True)
class Transfer:
    """A box of a band sent over the process group from its owner to ``relay``, once for all
    the ranks of the relay's host that need it; ``sent_at`` / ``received_at``: its offset in
    the owner's bytes for the relay and in the relay's bytes from the owner."""

    band: Band
    piece: BandPiece  # the relay's piece
    sent_at: int
    received_at: int


@dataclass
class _Round:
    """Where every byte of one round goes, the same on every rank: bands at ``band_at`` in
    their owner's segment (``band_end``: the end of those bands), and what crosses hosts."""

    bands: list[Band]
    band_at: dict[Band, int]
    band_end: list[int]
    transfers: list[Transfer]
    via: dict[tuple[Band, BandPiece], Transfer]  # a piece that arrives over the network
    sizes: dict[tuple[int, int], int]  # (owner, relay) -> bytes sent


def _plan_round(bands: list[Band], needs: list[list[Need]], hosts: list[int], shared: bool) -> _Round:
    """A piece for a rank of the owner's host is copied from the owner's segment (``shared``);
    the others cross hosts, each distinct box once per host, to the first rank of that host
    needing it (the relay), whose host copies it from the relay's segment."""
    world = len(needs)
    band_at, band_end = {}, [0] * world
    for band in bands:
        band_at[band] = band_end[band.owner]
        band_end[band.owner] += _padded(band.nbytes)
    first: dict[tuple, tuple[Band, BandPiece, int]] = {}  # distinct box per host -> (band, relay's piece, sent_at)
    box_of: dict[tuple[Band, BandPiece], tuple] = {}
    sizes: dict[tuple[int, int], int] = {}
    for band in bands:
        for p in band.pieces:
            if p.rank == band.owner or (shared and hosts[p.rank] == hosts[band.owner]):
                continue
            need = needs[p.rank][p.index]
            box = (band, hosts[p.rank], p.r0, p.r1, need.offsets[1:], need.lengths[1:])
            if box not in first:
                pair = (band.owner, p.rank)
                first[box] = (band, p, sizes.get(pair, 0))
                sizes[pair] = sizes.get(pair, 0) + _padded(need.rows_bytes(p.r1 - p.r0))
            box_of[(band, p)] = box
    # a relay receives the owners' bytes in rank order (the all-to-all's layout)
    before: dict[tuple[int, int], int] = {}
    for relay in sorted({p.rank for _, p, _ in first.values()}):
        at = 0
        for owner in range(world):
            before[(owner, relay)] = at
            at += sizes.get((owner, relay), 0)
    transfers = {
        box: Transfer(band, p, sent_at, before[(band.owner, p.rank)] + sent_at)
        for box, (band, p, sent_at) in first.items()
    }
    via = {key: transfers[box] for key, box in box_of.items()}
    return _Round(bands, band_at, band_end, list(transfers.values()), via, sizes)


class _Buffers:
    """Byte buffers reused from round to round: the send and receive buffers, and each reader
    thread's band buffer (fresh pages cost faults)."""

    def __init__(self):
        self.named: dict[str, torch.Tensor] = {}
        self.per_thread = threading.local()

    def get(self, name: str, n: int) -> torch.Tensor:
        if name not in self.named or self.named[name].numel() < n:
            self.named[name] = torch.empty(n, dtype=torch.uint8)
        return self.named[name][:n]

    def thread_buffer(self, n: int) -> torch.Tensor:
        buf = getattr(self.per_thread, "buf", None)
        if buf is None or buf.numel() < n:
            buf = self.per_thread.buf = torch.empty(n, dtype=torch.uint8)
        return buf[:n]


def _band_rows(buf: torch.Tensor, band: Band) -> torch.Tensor:
    return buf.view(band.need.dtype).view((band.r1 - band.r0,) + tuple(band.need.shape[1:]))


class _RoundIO:
    """One round of :func:`read_bands` on rank ``me``: reading the bands it owns (its own
    pieces straight to their destinations, the boxes other hosts need into the send buffer),
    then placing the pieces of other ranks' bands."""

    def __init__(self, rnd: _Round, needs, me, dests, read, shared: SharedMemory | None, buffers: _Buffers):
        self.rnd, self.needs, self.me, self.dests, self.read = rnd, needs, me, dests, read
        self.shared, self.buffers = shared, buffers
        world = len(needs)
        self.send_sizes = [rnd.sizes.get((me, r), 0) for r in range(world)]
        self.recv_sizes = [rnd.sizes.get((r, me), 0) for r in range(world)]
        self.send_base = [sum(self.send_sizes[:r]) for r in range(world)]
        self.send = buffers.get("send", sum(self.send_sizes))
        self.outgoing: dict[Band, list[Transfer]] = {}
        for t in rnd.transfers:
            self.outgoing.setdefault(t.band, []).append(t)

    @property
    def crosses_ranks(self) -> bool:
        """Whether any rank needs another's band this round (the same on every rank)."""
        return any(p.rank != b.owner for b in self.rnd.bands for p in b.pieces)

    def received(self, rank: int, n: int) -> torch.Tensor:
        """The bytes ``rank`` receives in the round: after its bands in its segment, or (no
        shared memory) in this rank's receive buffer."""
        if self.shared is None:
            return self.buffers.get("recv", n)
        if not n:
            return torch.empty(0, dtype=torch.uint8)
        own = torch.frombuffer(self.shared.own, dtype=torch.uint8)
        segment = self.shared.segments[rank] if rank != self.me else own
        end = self.rnd.band_end[rank]
        return segment[end : end + n]

    def reads(self) -> list[Callable[[], int]]:
        return [functools.partial(self._take, b) for b in self.rnd.bands if b.owner == self.me]

    def _take(self, band: Band) -> int:
        if self.shared is not None:
            at = self.rnd.band_at[band]
            buf = torch.frombuffer(self.shared.own, dtype=torch.uint8, count=band.nbytes, offset=at)
        else:
            buf = self.buffers.thread_buffer(band.nbytes)
        got = self.read(band, byte_view(buf))
        rows = _band_rows(buf, band)
        dtype = band.need.dtype
        for p in band.pieces:
            if p.rank == self.me:
                need = self.needs[self.me][p.index]
                _dest_rows(self.dests[p.index], need, p).copy_(_band_box(rows, band, need, p))
        for t in self.outgoing.get(band, []):
            src = _band_box(rows, band, self.needs[t.piece.rank][t.piece.index], t.piece)
            at = self.send_base[t.piece.rank] + t.sent_at
            self.send[at : at + src.numel() * dtype.itemsize].view(dtype).view(src.shape).copy_(src)
        return got

    def placements(self) -> list[Callable[[], int]]:
        me = self.me
        return [
            functools.partial(self._place, b, p) for b in self.rnd.bands for p in b.pieces if p.rank == me != b.owner
        ]

    def _place(self, band: Band, p: BandPiece) -> int:
        need = self.needs[self.me][p.index]
        dest = _dest_rows(self.dests[p.index], need, p)
        t = self.rnd.via.get((band, p))
        if t is None:  # the owner is on this host: cut the piece out of its band
            assert self.shared is not None  # pieces of other ranks' bands come over the network without it
            at = self.rnd.band_at[band]
            segment = self.shared.segments[band.owner]
            dest.copy_(_band_box(_band_rows(segment[at : at + band.nbytes], band), band, need, p))
        else:  # arrived over the network at this host's relay
            n = t.received_at + need.rows_bytes(p.r1 - p.r0)
            data = self.received(t.piece.rank, n)[t.received_at :]
            dest.copy_(data.view(need.dtype).view(dest.shape))
        return 0


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
) -> BandsRead:
    """Deliver this rank's shared needs into ``dests`` (need index -> destination of the
    box's shape, any dtype the stored one casts to). ``read(band, out)`` reads a band's bytes,
    ``run(tasks)`` runs tasks (concurrently), ``exchange(send, send_sizes, recv_sizes, recv)`` is
    the all-to-all of the bytes that cross hosts; ranks of one host (``shared``, its
    ``hosts``) pass bytes through their shared segments, ``barrier`` separating the rounds.
    Returns the bytes this rank read and received. Every rank must call it with the same plan:
    on a failure it raises only after the last round, having taken part in all (:class:`Rounds`)."""
    hosts = shared.hosts if shared is not None else list(range(len(needs)))
    buffers, rounds = _Buffers(), Rounds()
    nread = remote = 0
    for round_no in range(plan.rounds):
        rnd = _plan_round([b for b in plan.bands if b.round == round_no], needs, hosts, shared is not None)
        io = _RoundIO(rnd, needs, me, dests, read, shared, buffers)
        nread += rounds.attempt(lambda: sum(run(io.reads())), 0)
        if not io.crosses_ranks:
            continue
        if rnd.transfers:
            exchange(io.send, io.send_sizes, io.recv_sizes, io.received(me, sum(io.recv_sizes)))
            remote += sum(io.recv_sizes)
        if shared is not None:
            barrier()  # every band and every relayed box of the round is in its segment
        rounds.attempt(lambda: run(io.placements()), None)
        if shared is not None:
            barrier()  # every rank has copied its pieces: the segments may be reused
    rounds.raise_failure()
    return BandsRead(nread, remote)
