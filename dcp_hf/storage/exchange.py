"""Moving bytes between ranks, shared by every storage back end.

A save cuts byte ranges of its files into *parts*, each assembled by one rank (its owner:
the rank holding most of its bytes); the other ranks send the owner their pieces of it over
the process group, in rounds that bound the bytes a rank holds at once. Object stores need
this (a multipart upload takes whole parts); on a file system it turns the short interleaved
runs of column shards into long writes, one rank per range.

A piece is a sub-grid of a chunk's runs (see ``RunGrid.clip``), so a part gathers a few
pieces per chunk however short the runs are, each placed with one strided copy.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from dcp_hf.boxes import RunGrid, byte_view
from dcp_hf.errors import DcpHfError

T = TypeVar("T")


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map the pages at once, not one fault each


@dataclass(frozen=True)
class Part:
    """Bytes [lo, hi) of file number ``file``, assembled and written by ``owner`` in ``round``;
    ``number``: its 1-based number among the parts of its file (multipart part number)."""

    file: int
    number: int
    lo: int
    hi: int
    owner: int
    round: int


@dataclass(frozen=True)
class Region:
    """A byte range [lo, hi) of a file whose bytes go through parts of ``width`` bytes."""

    file: int
    lo: int
    hi: int
    width: int


@dataclass(frozen=True)
class Holding:
    """A chunk ``rank`` writes: its byte span [lo, hi) of ``file`` and the bytes it holds there."""

    rank: int
    file: int
    lo: int
    hi: int
    nbytes: int


def plan_parts(
    regions: list[Region], holdings: list[Holding], round_bytes: int, whole_files: bool = False
) -> list[Part]:
    """The parts of ``regions`` (in order), each owned by the rank holding most of its bytes;
    ranks holding about as much (within 10%) share the parts by load. With ``whole_files``,
    every part of a file goes to the rank holding most of the file (files written in order by
    one rank). Rounds group consecutive parts so no rank owns more than ``round_bytes`` in one."""
    cells: list[tuple[int, int, int]] = []  # (file, lo, hi) of every part
    first_cell: list[int] = []
    for region in regions:
        first_cell.append(len(cells))
        for lo in range(region.lo, max(region.hi, region.lo + 1), region.width):
            cells.append((region.file, lo, min(region.hi, lo + region.width)))
    votes: list[dict[int, float]] = [{} for _ in cells]
    by_file: dict[int, list[int]] = {}
    for i, region in enumerate(regions):
        by_file.setdefault(region.file, []).append(i)
    for h in holdings:
        density = h.nbytes / max(h.hi - h.lo, 1)
        for i in by_file.get(h.file, []):
            region = regions[i]
            if h.hi <= region.lo or h.lo >= region.hi:
                continue
            k0 = (max(h.lo, region.lo) - region.lo) // region.width
            k1 = (min(h.hi, region.hi) - 1 - region.lo) // region.width
            for k in range(k0, k1 + 1):
                _, lo, hi = cells[first_cell[i] + k]
                inside = min(h.hi, hi) - max(h.lo, lo)
                if inside > 0:
                    v = votes[first_cell[i] + k]
                    v[h.rank] = v.get(h.rank, 0.0) + inside * density
    if whole_files:
        file_votes: dict[int, dict[int, float]] = {}
        for (f, _, _), v in zip(cells, votes):
            total = file_votes.setdefault(f, {})
            for rank, n in v.items():
                total[rank] = total.get(rank, 0.0) + n
        votes = [file_votes[f] for f, _, _ in cells]
    parts: list[Part] = []
    round_no = 0
    in_round: dict[int, int] = {}  # rank -> bytes it owns in the open round
    assigned: dict[int, int] = {}  # rank -> bytes it owns
    numbers: dict[int, int] = {}  # file -> parts of it so far
    for (f, lo, hi), v in zip(cells, votes):
        best = max(v.values(), default=0.0)
        candidates = sorted(r for r, n in v.items() if n >= 0.9 * best) or [0]
        owner = candidates[0] if whole_files else min(candidates, key=lambda r: (assigned.get(r, 0), r))
        if in_round.get(owner, 0) + (hi - lo) > round_bytes and in_round:
            round_no, in_round = round_no + 1, {}
        in_round[owner] = in_round.get(owner, 0) + hi - lo
        assigned[owner] = assigned.get(owner, 0) + hi - lo
        numbers[f] = numbers.get(f, 0) + 1
        parts.append(Part(f, numbers[f], lo, hi, owner, round_no))
    return parts


@dataclass
class PartBytes:
    """Bytes for a part: the sub-grid ``grid`` of a tensor whose data starts at byte ``base``
    of file ``file``; ``data`` holds the grid's bytes in order, a view into ``keep`` (held so
    the memory outlives the view)."""

    file: int
    base: int
    grid: RunGrid
    data: memoryview
    keep: object

    @property
    def offset(self) -> int:
        """The file offset of the piece's first byte."""
        return self.base + self.grid.start


def pieces_in(file: int, base: int, grid: RunGrid, tensor: torch.Tensor, lo: int, hi: int) -> list[PartBytes]:
    """The pieces of a chunk (its runs ``grid`` at file offset ``base``, bytes from the
    contiguous CPU ``tensor``) that fall inside file bytes [lo, hi)."""
    src = byte_view(tensor)
    return [
        PartBytes(file, base, g, src[at : at + g.nbytes], tensor)
        for g, at in grid.clip(lo - base, hi - base)
        if g.nbytes
    ]


def exchange(outgoing: dict[int, list[PartBytes]], group, world: int, shared=None) -> tuple[list[PartBytes], int]:
    """Send each rank its pieces; return the pieces sent to this rank and how many of their
    bytes came over the process group (from other hosts). An all-to-all of the
    sizes, one of the pieces' descriptions, and the bytes: pieces for a rank of this host
    (``shared``: a :class:`SharedMemory`, its ``hosts``) are copied into this rank's segment,
    which the receiver reads in place (call :func:`end_round` before the next exchange reuses
    the segments); pieces for other hosts go in one more all-to-all, so only they cross the
    network, each once."""
    me = dist.get_rank(group)
    hosts = shared.hosts if shared is not None else list(range(world))
    meta_out, data_out, counts = [], [], torch.zeros(world, 2, dtype=torch.int64)
    at_shared, at_sent = 0, 0
    for rank in range(world):
        items = outgoing.get(rank, [])
        local = hosts[rank] == hosts[me]
        for p in items:
            meta_out += _describe(p, at_shared if local else at_sent)
            data_out.append((local, p.data))
            if local:
                at_shared += len(p.data)
            else:
                at_sent += len(p.data)
        counts[rank, 1] = 0 if local else sum(len(p.data) for p in items)
        counts[rank, 0] = len(meta_out) - int(counts[:rank, 0].sum())
    counts_in = torch.empty_like(counts)
    all_to_all(counts_in, counts, None, None, group)
    if at_shared > (shared.size if shared is not None else 0):
        raise RuntimeError(f"{at_shared} bytes to send, but the shared segment holds {shared.size}")
    # the bytes go to the segment before the descriptions leave
    segment = memoryview(shared.own) if at_shared else memoryview(b"")
    data_send = torch.empty(at_sent, dtype=torch.uint8)
    sent = byte_view(data_send)
    pos = {True: 0, False: 0}
    for local, chunk in data_out:
        out = segment if local else sent
        out[pos[local] : pos[local] + len(chunk)] = chunk
        pos[local] += len(chunk)
    meta_in = torch.empty(int(counts_in[:, 0].sum()), dtype=torch.int64)
    all_to_all(
        meta_in, torch.tensor(meta_out, dtype=torch.int64), counts_in[:, 0].tolist(), counts[:, 0].tolist(), group
    )
    data_in = torch.empty(int(counts_in[:, 1].sum()), dtype=torch.uint8)
    if len(set(hosts)) > 1:  # every rank knows whether any piece crosses hosts
        all_to_all(data_in, data_send, counts_in[:, 1].tolist(), counts[:, 1].tolist(), group)
    received, meta, i, taken = [], meta_in.tolist(), 0, 0
    for source in range(world):
        end = i + int(counts_in[source, 0])
        while i < end:
            offset, file, base, start, run_len, ndim = meta[i : i + 6]
            dims = meta[i + 6 : i + 6 + 2 * ndim]
            grid = RunGrid(start, run_len, tuple(dims[:ndim]), tuple(dims[ndim:]))
            if hosts[source] == hosts[me]:
                keep = shared.segments[source]
                data = byte_view(keep)[offset : offset + grid.nbytes]
            else:
                keep = data_in
                data = byte_view(data_in)[taken : taken + grid.nbytes]
                taken += grid.nbytes
            received.append(PartBytes(file, base, grid, data, keep))
            i += 6 + 2 * ndim
    return received, data_in.numel()


class Rounds:
    """The failure rule of collective rounds (the save's parts, the load's bands): a rank whose
    step fails keeps taking part in every later round, sending nothing, so no rank waits
    forever for it; its first failure is raised after the last round."""

    def __init__(self, failure: BaseException | None = None):
        self.failure = failure

    def attempt(self, step: Callable[[], T], otherwise: T) -> T:
        """``step()``, or ``otherwise`` where this rank failed before or ``step`` fails now."""
        if self.failure is None:
            try:
                return step()
            except Exception as e:  # noqa: BLE001 - kept: raised after the last round
                self.failure = e
        return otherwise

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def end_round(group, shared) -> None:
    """Where pieces were read from shared segments: wait until every rank has used them."""
    if shared is not None:
        dist.barrier(group=group)


def _describe(p: PartBytes, offset: int) -> list[int]:
    g = p.grid
    return [offset, p.file, p.base, g.start, g.run_len, len(g.counts), *g.counts, *g.strides]


def assemble(part: Part, header: bytes, pieces: list[PartBytes]) -> torch.Tensor:
    """The part's bytes (a uint8 tensor) from the file's header and the pieces; every byte
    must be covered exactly once."""
    out = torch.empty(part.hi - part.lo, dtype=torch.uint8)
    filled = 0
    if part.lo < len(header):
        n = min(len(header), part.hi) - part.lo
        byte_view(out)[:n] = header[part.lo : part.lo + n]
        filled += n
    for p in pieces:
        g = p.grid
        dst = out.as_strided(g.counts + (g.run_len,), g.strides + (1,), p.offset - part.lo)
        dst.copy_(torch.frombuffer(p.data, dtype=torch.uint8).view(dst.shape))
        filled += g.nbytes
    if filled != out.numel():
        raise RuntimeError(
            f"part {part.number} of file {part.file}: {filled} of {out.numel()} bytes "
            f"arrived; not writing an incomplete part"
        )
    return out


class PartIndex:
    """The parts of a save by file and offset."""

    def __init__(self, parts: list[Part]):
        self.by_file: dict[int, list[Part]] = {}
        for p in sorted(parts, key=lambda p: (p.file, p.lo)):
            self.by_file.setdefault(p.file, []).append(p)
        self.los = {f: [p.lo for p in ps] for f, ps in self.by_file.items()}

    def of(self, file: int, offset: int) -> Part:
        """The part that holds byte ``offset`` of ``file``."""
        part = self.covering(file, offset)
        if part is None:
            raise KeyError(f"no part holds byte {offset} of file {file}")
        return part

    def covering(self, file: int, offset: int) -> Part | None:
        parts = self.by_file.get(file)
        if not parts:
            return None
        i = bisect.bisect_right(self.los[file], offset) - 1
        return parts[i] if i >= 0 and parts[i].lo <= offset < parts[i].hi else None

    def covers(self, file: int, offset: int) -> bool:
        return self.covering(file, offset) is not None

    def overlapping(self, file: int, lo: int, hi: int) -> list[Part]:
        """The parts of ``file`` that overlap bytes [lo, hi)."""
        parts = self.by_file.get(file, [])
        i = max(0, bisect.bisect_right(self.los.get(file, []), lo) - 1)
        out = []
        while i < len(parts) and parts[i].lo < hi:
            if parts[i].hi > lo:
                out.append(parts[i])
            i += 1
        return out


class PartWriter:
    """Writes parts (uint8 tensors) through ``write(part, data)`` from a pool of threads while the caller
    assembles the next ones, across rounds; at most ``max_bytes`` of parts are in flight
    (``submit`` waits for room). The first failure is raised by the next ``submit`` or by
    ``receipts``."""

    def __init__(self, write, threads: int, max_bytes: int):
        self.write, self.max_bytes = write, max_bytes
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dcp-hf-part")
        self.room = threading.Condition()
        self.in_flight = 0
        self.error: BaseException | None = None
        self.futures: list = []

    def submit(self, part: Part, data: torch.Tensor) -> None:
        n = data.numel()
        with self.room:
            while self.error is None and self.in_flight and self.in_flight + n > self.max_bytes:
                self.room.wait()
            if self.error is not None:
                raise self.error
            self.in_flight += n
        self.futures.append(self.pool.submit(self._write, part, data, n))

    def _write(self, part: Part, data, n: int) -> tuple[int, int, str | None]:
        try:
            return part.file, part.number, self.write(part, data)
        except BaseException as e:
            with self.room:
                self.error = self.error or e
            raise
        finally:
            with self.room:
                self.in_flight -= n
                self.room.notify_all()

    def receipts(self) -> list[tuple[int, int, str | None]]:
        """Wait for every write; (file, part number, receipt) of each (an ETag on S3)."""
        return [f.result() for f in self.futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def exchange_bytes(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], recv: torch.Tensor, group):
    """One all-to-all of bytes whose sizes both sides already know from a plan they share
    (loads: ``storage.shared_reads``); ``send`` and ``recv`` hold each rank's segment, in rank
    order."""
    all_to_all(recv, send, recv_sizes, send_sizes, group)


def collective_device(group) -> torch.device:
    """The device of the tensors the group's collectives take: the CPU where the group has a
    CPU backend (gloo, or torch's default pair of gloo and NCCL), else the current device of its
    accelerator (an NCCL-only group, as most training jobs create, rejects CPU tensors)."""
    types = [d.type for d in getattr(group if group is not None else dist.group.WORLD, "_device_types", [])]
    if not types or "cpu" in types:
        return torch.device("cpu")
    module = torch.get_device_module(types[0])
    if not module.is_available():
        raise DcpHfError(
            f"the process group ({dist.get_backend(group)}) takes only {types[0]} tensors, and this process "
            f"has no {types[0]} device: give it a CPU backend (e.g. init_process_group('cpu:gloo,cuda:nccl'))"
        )
    return torch.device(types[0], module.current_device())


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_sizes, in_sizes, group) -> None:
    """``dist.all_to_all_single`` of CPU tensors on any group: through the group's device where
    it has no CPU backend."""
    device = collective_device(group)
    if device.type == "cpu":
        dist.all_to_all_single(out, inp, out_sizes, in_sizes, group=group)
        return
    staged = torch.empty_like(out, device=device)
    dist.all_to_all_single(staged, inp.to(device), out_sizes, in_sizes, group=group)
    out.copy_(staged)


class SharedMemory:
    """Ranks on one host exchange bytes through shared memory: each rank puts what it passes
    on in a round (the bands it read, the pieces it sends) in its own segment (a file in
    /dev/shm, blocks reserved so a full tmpfs is an error, never SIGBUS), and the ranks of its
    host copy their pieces out of it. One copy per byte, no socket. The files are unlinked as
    soon as every rank has opened them, so nothing is left behind. ``hosts[rank]``: the lowest
    rank that shares that rank's /dev/shm (its host); ``segments`` holds this host's."""

    ROOT = "/dev/shm"

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size
        path = os.path.join(self.ROOT, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
            self.own = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE) if size else None
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.segments: dict[int, torch.Tensor] = {}
        self.hosts: list[int] = []
        self._maps: list = [self.own] if self.own is not None else []

    @classmethod
    def usable(cls) -> bool:
        return os.path.isdir(cls.ROOT) and hasattr(os, "posix_fallocate")

    def attach(self, rank: int, name: str, size: int) -> bool:
        """Map another rank's segment; False where it is not visible (another host)."""
        try:
            fd = os.open(os.path.join(self.ROOT, name), os.O_RDWR)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != size:
                return False
            if not size:
                return True
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except OSError:
            return False
        finally:
            os.close(fd)
        self._maps.append(m)
        self.segments[rank] = torch.frombuffer(m, dtype=torch.uint8)
        return True

    def unlink(self) -> None:
        try:
            os.unlink(os.path.join(self.ROOT, self.name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        self.segments.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still exported: the mapping goes with the last view
                pass
        self._maps = []


def open_shared(size: int, group, me: int, world: int, prefix: str):
    """A shared memory segment of ``size`` bytes for this rank, with the segments of the other
    ranks of its host attached, when some ranks of the group share a host (``hosts`` says
    which); else None on every rank (every byte then goes over the process group). Collective."""
    import secrets

    memory = None
    if SharedMemory.usable():
        try:
            memory = SharedMemory(f"{prefix}-{secrets.token_hex(8)}-{me}", size)
        except OSError:
            memory = None
    names: list = [None] * world
    dist.all_gather_object(names, (memory.name, size) if memory else None, group=group)
    seen = {me} if memory is not None else set()
    if memory is not None:
        seen |= {r for r, n in enumerate(names) if r != me and n is not None and memory.attach(r, n[0], n[1])}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, seen, group=group)
    hosts = same_hosts(everyone)
    if memory is not None:
        memory.unlink()  # every rank that could open it has: nothing is left behind
        if len(set(hosts)) == world:  # no two ranks share a host
            memory.close()
            memory = None
        else:
            memory.hosts = hosts
            for r in [r for r in memory.segments if hosts[r] != hosts[me]]:
                del memory.segments[r]
    return memory


def same_hosts(seen: list[set[int]]) -> list[int]:
    """Per rank, the lowest rank of its host, from the ranks each rank could see (itself
    included): two ranks share a host when each saw the other."""
    return [min(s for s in seen[r] if r in seen[s]) if r in seen[r] else r for r in range(len(seen))]
