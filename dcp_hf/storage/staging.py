"""Staging between device tensors and file I/O through a bounded ring of host buffers.

A save reads its tensors as host bytes; a load fills host bytes that end up in (device)
tensors. :class:`Stager` moves them through ``slots`` host buffers of ``slot_bytes`` each
(pinned when a CUDA tensor uses them), so memory stays bounded whatever the model size, and
overlaps the copies with the caller's I/O:

- save: ``for piece in stager.save(slabs)`` yields each slab's bytes in order, in pieces of at
  most ``slot_bytes``. The copy of the next pieces (device to host, issued ``non_blocking`` on
  a side CUDA stream, the export dtype cast on the device first) runs while the caller writes
  the current one; a slot is reused only after the caller released its piece.
- load: ``for piece in stager.load(slabs)`` yields host buffers (in the checkpoint's dtype) to
  fill; when the caller finishes a piece its bytes are copied into the destination view
  (host to device straight into the destination, ``non_blocking``, cast on the device), and
  the slot stays busy until that copy has completed.

Each piece is a *box* of its slab (``offsets``, ``sizes``): how a slab is cut is defined by
:func:`cut`. Pieces that need no copy (a contiguous CPU tensor already in the right dtype)
use no slot: their ``host`` is a view of the tensor itself. Every other piece goes through a
slot, and the copy runs on a side CUDA stream (CUDA tensors) or, for CPU tensors (a dtype
cast, a non-contiguous view, or staging forced with ``force=True`` / ``DCP_HF_FORCE_STAGING=1``),
on ``cpu_threads`` worker threads that play the stream's part: the same pipeline, so the CPU
test suite exercises the ordering, slot reuse, cutting and error paths of the CUDA one.

Use ``with stager.save(slabs) as run:`` and ``with piece:`` (or :func:`pump`, which runs the
pieces on a thread pool). A piece's exit releases its slot; on a normal exit a load piece is
first copied into its destination, on an exception it is dropped. The run's normal exit
(``Run.flush``) waits until every piece is released and every copy has completed (a load's
destinations then hold their data); its exit on an error (``Run.close``) waits for the copies
in flight and frees every slot. Threading: one thread iterates a run; any thread may use,
finish and release its pieces. One run at a time per stager (a new run first ends an
abandoned one). A consumer on a single thread that holds every slot must release a piece
before asking for the next one (it would otherwise wait for itself).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import threading
from collections import deque
from typing import Any, Callable, Generator, Iterable, Iterator, NamedTuple, TypeVar

import torch

from dcp_hf.boxes import byte_view

FORCE_ENV = "DCP_HF_FORCE_STAGING"
SLOT_BYTES = 16 << 20  # the slots the writer and reader use: a few keep the copies ahead of the I/O
T = TypeVar("T")


class Slab(NamedTuple):
    """One tensor to stage. Save: ``tensor`` is the source (any device, any strides) and
    ``dtype`` the dtype its bytes are written in. Load: ``tensor`` is the destination and
    ``dtype`` the dtype of the bytes read (the checkpoint's). ``tag`` is the caller's, handed
    back with each piece."""

    tensor: torch.Tensor
    dtype: torch.dtype
    tag: Any = None


def cut(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes (offsets, sizes) a C-order tensor of ``shape`` is staged in, in order: each a
    contiguous range of the tensor's bytes of at most ``max_bytes``. As many whole rows of dim 0
    as fit; a row larger than ``max_bytes`` is cut the same way along dim 1, and so on (on the
    last dim, runs of elements). A tensor with no elements is one box."""
    shape = tuple(shape)
    if itemsize > max_bytes:
        raise ValueError(f"a staging slot of {max_bytes} bytes cannot hold one element of {itemsize} bytes")
    if math.prod(shape) * itemsize <= max_bytes:
        yield (0,) * len(shape), shape
        return
    row = math.prod(shape[1:]) * itemsize
    if row <= max_bytes:
        step = max_bytes // row
        for r in range(0, shape[0], step):
            yield (r,) + (0,) * (len(shape) - 1), (min(step, shape[0] - r),) + shape[1:]
        return
    for r in range(shape[0]):
        for offsets, sizes in cut(shape[1:], itemsize, max_bytes):
            yield (r,) + offsets, (1,) + sizes


def box_view(tensor: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    return tensor[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


def _wait(handle) -> None:
    """Wait for a copy: a CUDA event, or the future of the worker thread's copy (re-raising
    its error)."""
    if handle is None:
        return
    if isinstance(handle, cf.Future):
        handle.result()
    else:
        handle.synchronize()


class StagedBox:
    """A box of a slab, as host bytes. ``host`` is a contiguous CPU tensor of the slab's
    ``dtype`` and the box's ``sizes``; ``data`` its bytes (save: to write; load: to fill).
    ``offsets``/``sizes`` place the box in the slab; ``tag`` is the slab's."""

    def __init__(self, stager: "Stager", run: int, slab: Slab, offsets, sizes, host, slot: int | None, load: bool):
        self.tag, self.offsets, self.sizes, self.host = slab.tag, offsets, sizes, host
        self.nbytes = host.numel() * host.element_size()
        self._stager, self._run, self._slab, self._slot, self._load = stager, run, slab, slot, load
        self._copy = None  # save: the copy into the slot
        self._after: Any = None  # CUDA: the caller's stream, which the copy waits for
        self._released = False

    @property
    def data(self) -> memoryview:
        return byte_view(self.host)

    def release(self) -> None:
        """Done with this piece (a load piece is dropped: its destination is not written)."""
        self._stager._release(self, None)

    def finish(self) -> None:
        """Save: the same as ``release``. Load: copy the filled bytes into the destination,
        then release the slot (once that copy has completed)."""
        if not self._load or self._slot is None or self._released or not self._stager._current(self._run):
            self.release()  # nothing to copy, or already done, or its run was ended: no copy
            return
        try:
            handle = self._stager._copy(box_view(self._slab.tensor, self.offsets, self.sizes), self.host, self._after)
        except BaseException:
            self.release()
            raise
        self._stager._release(self, handle)

    def __enter__(self) -> "StagedBox":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.release()


class Stager:
    """A bounded ring of ``slots`` host buffers of ``slot_bytes`` each, allocated on first use
    and kept for later runs (``close`` frees them). See the module's docstring."""

    def __init__(self, slots: int = 3, slot_bytes: int = 64 << 20, force: bool | None = None, cpu_threads: int = 1):
        if slots < 1 or slot_bytes < 16 or cpu_threads < 1:
            raise ValueError(f"a staging ring needs at least 1 slot of 16 bytes, not {slots} of {slot_bytes}")
        self.slots, self.slot_bytes, self.cpu_threads = slots, slot_bytes, cpu_threads
        self.force = os.environ.get(FORCE_ENV, "") == "1" if force is None else force
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._buffers: list[torch.Tensor | None] = [None] * self.slots
        self._pinned = [False] * self.slots
        self._held = [False] * self.slots
        self._last: list = [None] * self.slots  # each slot's last copy (a slot is reused after it)
        self._next = 0  # round robin: the slot tried first
        self._run = getattr(self, "_run", 0)  # the current run's number; pieces of older runs are ignored
        self._active = False
        self._worker: cf.ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}

    def __getstate__(self):  # a writer travels to async_save's process: no buffers or threads
        return {
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "force": self.force,
            "cpu_threads": self.cpu_threads,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # -- runs ---------------------------------------------------------------------------------
    def save(self, slabs: Iterable[Slab]) -> "Run":
        """Each slab's bytes in ``slab.dtype``, in order, in pieces of at most ``slot_bytes``.
        ``slabs`` is read lazily (a few pieces ahead), so sources can be produced on demand."""
        run = self._begin()
        return Run(self, run, self._save(run, slabs))

    def load(self, slabs: Iterable[Slab]) -> "Run":
        """Host buffers (``slab.dtype``) for each slab's boxes in order, to fill; finishing a
        piece copies it into the slab's tensor (``Run.flush`` waits for those copies)."""
        run = self._begin()
        return Run(self, run, self._load(run, slabs))

    def _save(self, run: int, slabs: Iterable[Slab]) -> Generator[StagedBox, None, None]:
        pending: deque[StagedBox] = deque()  # copies issued, pieces not yet yielded (in order)
        boxes = self._boxes(slabs)
        ok = False
        try:
            nxt = next(boxes, None)
            while nxt is not None or pending:
                while nxt is not None and len(pending) < self.slots:
                    piece = self._stage_out(run, *nxt, block=not pending)
                    if piece is None:  # every slot is with the caller or in flight
                        break
                    pending.append(piece)
                    nxt = next(boxes, None)
                piece = pending.popleft()
                _wait(piece._copy)
                self._check(run)
                yield piece
            ok = True
        finally:
            if not ok:  # an error or an abandoned run; a complete one ends with Run.flush
                self._end(run)

    def _load(self, run: int, slabs: Iterable[Slab]) -> Generator[StagedBox, None, None]:
        ok = False
        try:
            for slab, offsets, sizes in self._boxes(slabs):
                dest = box_view(slab.tensor, offsets, sizes)
                if not self._needs_copy(dest, slab.dtype):
                    host = dest if dest.numel() else torch.empty(sizes, dtype=slab.dtype)
                    yield StagedBox(self, run, slab, offsets, sizes, host, None, load=True)
                    continue
                slot = self._take(run, block=True, pinned=dest.is_cuda)
                assert slot is not None  # a blocking take waits for a slot
                piece = StagedBox(self, run, slab, offsets, sizes, self._host(slot, slab.dtype, sizes), slot, load=True)
                if dest.is_cuda:
                    piece._after = torch.cuda.current_stream(dest.device)  # the caller's stream, not a worker's
                self._check(run)
                yield piece
            ok = True
        finally:
            if not ok:
                self._end(run)

    def close(self) -> None:
        """Wait for every copy, free the buffers and stop the worker thread."""
        self._end(self._run)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self._reset()

    def __enter__(self) -> "Stager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _boxes(self, slabs: Iterable[Slab]) -> Iterator[tuple[Slab, tuple[int, ...], tuple[int, ...]]]:
        for slab in slabs:
            for offsets, sizes in cut(tuple(slab.tensor.shape), slab.dtype.itemsize, self.slot_bytes):
                yield slab, offsets, sizes

    def _needs_copy(self, view: torch.Tensor, dtype: torch.dtype) -> bool:
        if view.numel() == 0:
            return False
        return self.force or view.device.type != "cpu" or view.dtype != dtype or not view.is_contiguous()

    def _stage_out(self, run: int, slab: Slab, offsets, sizes, block: bool) -> StagedBox | None:
        src = box_view(slab.tensor, offsets, sizes)
        if not self._needs_copy(src, slab.dtype):
            host = src if src.numel() else torch.empty(sizes, dtype=slab.dtype)
            return StagedBox(self, run, slab, offsets, sizes, host, None, load=False)
        slot = self._take(run, block, pinned=src.is_cuda)
        if slot is None:
            return None
        piece = StagedBox(self, run, slab, offsets, sizes, self._host(slot, slab.dtype, sizes), slot, load=False)
        after = torch.cuda.current_stream(src.device) if src.is_cuda else None
        try:
            piece._copy = self._copy(piece.host, src, after)
        except BaseException:
            piece.release()
            raise
        with self._cond:
            self._last[slot] = piece._copy
        return piece

    def _take(self, run: int, block: bool, pinned: bool) -> int | None:
        """A free slot, marked held, once its last copy has completed (None if none is free
        and not ``block``)."""
        with self._cond:
            while True:
                self._check(run)
                free = [i for i in range(self.slots) if not self._held[(self._next + i) % self.slots]]
                if free:
                    slot = (self._next + free[0]) % self.slots
                    self._next = (slot + 1) % self.slots
                    self._held[slot] = True
                    last, self._last[slot] = self._last[slot], None
                    break
                if not block:
                    return None
                self._cond.wait()
        try:
            _wait(last)
            if self._buffers[slot] is None or (pinned and not self._pinned[slot]):
                self._buffers[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pinned)
                self._pinned[slot] = pinned
        except BaseException:
            self._free(run, slot, None)
            raise
        return slot

    def _host(self, slot: int, dtype: torch.dtype, sizes) -> torch.Tensor:
        nbytes = math.prod(sizes) * dtype.itemsize
        buffer = self._buffers[slot]
        assert buffer is not None  # allocated when the slot was taken
        return buffer[:nbytes].view(dtype).view(sizes)

    def _release(self, piece: StagedBox, handle) -> None:
        with self._cond:
            if piece._released:
                return
            piece._released = True
        if piece._slot is not None:
            self._free(piece._run, piece._slot, handle)

    def _free(self, run: int, slot: int, handle) -> None:
        with self._cond:
            if run == self._run and self._active:  # a piece of an ended run holds nothing any more
                self._held[slot] = False
                if handle is not None:
                    self._last[slot] = handle
                self._cond.notify_all()

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> Any:
        """Start copying ``src`` into ``dst`` (shapes equal; one of them a host slot); return
        what to wait for."""
        device = src.device if src.is_cuda else dst.device
        if device.type != "cuda":  # CPU (or another device, copied synchronously there)
            with self._cond:
                if self._worker is None:
                    self._worker = cf.ThreadPoolExecutor(self.cpu_threads, thread_name_prefix="dcp-hf-stage")
            return self._worker.submit(dst.copy_, src)
        with self._cond:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_stream(after)  # the caller's earlier work on these tensors comes first
            if src.dtype == dst.dtype and src.is_contiguous() and dst.is_contiguous():
                dst.copy_(src, non_blocking=True)  # one DMA (a load: straight into the destination)
            elif src.is_cuda:  # save: cast and gather on the device into a buffer, then one DMA
                tmp = torch.empty(src.shape, dtype=dst.dtype, device=device)
                tmp.copy_(src)
                dst.copy_(tmp, non_blocking=True)
            else:  # load: one DMA into a device buffer, then cast / scatter on the device
                tmp = torch.empty(src.shape, dtype=src.dtype, device=device)
                tmp.copy_(src, non_blocking=True)
                dst.copy_(tmp)
            # The tensors stay referenced (piece, slab) until this event is waited for; ``tmp``
            # is freed on this stream, so the allocator reuses it only after these copies.
            event = torch.cuda.Event(blocking=True)
            event.record(stream)
        return event

    def _begin(self) -> int:
        if self._active:  # an abandoned run (e.g. its consumer raised): end it first
            self._end(self._run)
        with self._cond:
            self._run += 1
            self._active = True
            return self._run

    def _current(self, run: int) -> bool:
        with self._cond:
            return run == self._run and self._active

    def _check(self, run: int) -> None:
        if run != self._run or not self._active:
            raise RuntimeError("this staging run was ended (a newer run started, or the stager was closed)")

    def _drain(self, run: int) -> None:
        """Wait until every piece is released, then for every copy (raising its error)."""
        with self._cond:
            while any(self._held) and run == self._run:
                self._cond.wait()
            self._check(run)
            last = list(self._last)
        for handle in last:
            _wait(handle)

    def _end(self, run: int) -> None:
        """End a run (normally or not): wait for its copies (so nothing writes into a buffer or
        destination any more), then free every slot; pieces still out hold nothing."""
        with self._cond:
            if run != self._run or not self._active:
                return
            last = list(self._last)
        for handle in last:
            try:
                _wait(handle)
            except Exception:  # the run already failed; the copy's error was or will be raised
                pass
        with self._cond:
            self._active = False
            self._held = [False] * self.slots
            self._last = [None] * self.slots
            self._cond.notify_all()


class Run:
    """The pieces of one ``save`` or ``load``, in order. Use as a context manager (or call
    ``flush``/``close``): on a normal exit ``flush`` waits until every piece is released and
    every copy has completed (a load's destinations then hold their data) and raises a copy's
    error; on an exception ``close`` ends the run (its copies waited for, its slots freed)."""

    def __init__(self, stager: Stager, number: int, pieces: Generator[StagedBox, None, None]):
        self._stager, self._number, self._pieces = stager, number, pieces
        self._ended = False

    def __iter__(self) -> "Run":
        return self

    def __next__(self) -> StagedBox:
        return next(self._pieces)

    def flush(self) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            self._stager._drain(self._number)
        finally:
            self._stager._end(self._number)

    def close(self) -> None:
        self._ended = True
        self._pieces.close()
        self._stager._end(self._number)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.close()


def pump(pieces: Run, work: Callable[[StagedBox], T], pool: cf.Executor, limit: int = 8) -> Iterator[T]:
    """Run ``work(piece)`` on ``pool`` for each piece of a run, inside ``with piece`` (a load
    piece is copied to its destination when ``work`` succeeds); yield the results as they
    complete, with at most ``limit`` pieces queued, then flush the run. At the first error no
    further piece is taken, queued work is cancelled, running work is waited for, the run is
    closed and the error raised."""

    def run(piece: StagedBox) -> T:
        with piece:
            return work(piece)

    futures: set[cf.Future] = set()
    ok = False
    try:
        for piece in pieces:
            futures.add(pool.submit(run, piece))
            while futures:
                done, _ = cf.wait(futures, timeout=0 if len(futures) < limit else None, return_when=cf.FIRST_COMPLETED)
                if not done:
                    break
                for fut in done:
                    futures.discard(fut)
                    yield fut.result()
        while futures:
            done, futures = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
        ok = True
    finally:
        if not ok:
            for fut in futures:
                fut.cancel()
            cf.wait(futures)
            pieces.close()
    pieces.flush()
