"""Boxes (offsets, sizes) of row-major tensors, and the byte runs they occupy on storage."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dcp_hf.errors import StateDictMismatchError


class Box(NamedTuple):
    """A box of a tensor: the index of its first element and its extent in each dim."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy; keep ``t`` alive)."""
    if not (t.is_contiguous() and t.device.type == "cpu"):
        raise ValueError("byte_view needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


@dataclass(frozen=True)
class RunGrid:
    """The byte runs of a box inside a row-major tensor.

    ``prod(counts)`` runs of ``run_len`` bytes. Run number i (C order over ``counts``) starts at
    byte ``start + sum(i_d * strides[d])`` of the tensor's data and holds bytes
    ``[i * run_len, (i + 1) * run_len)`` of the box's own contiguous buffer.
    """

    start: int
    run_len: int
    counts: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    @property
    def num_runs(self) -> int:
        return math.prod(self.counts)

    @property
    def nbytes(self) -> int:
        return self.num_runs * self.run_len

    def span(self) -> tuple[int, int]:
        """First and one-past-last byte the grid touches (relative to the tensor start)."""
        last = self.start + sum((c - 1) * s for c, s in zip(self.counts, self.strides))
        return self.start, last + self.run_len

    def starts(self) -> list[int]:
        starts = [self.start]
        for count, stride in zip(self.counts, self.strides):
            starts = [s + i * stride for s in starts for i in range(count)]
        return starts

    def clip(self, lo: int, hi: int) -> list[tuple["RunGrid", int]]:
        """The grid's bytes inside [lo, hi) (positions relative to the tensor start, as
        ``start``), as a few sub-grids, each with the offset of its bytes in the box's buffer:
        the outer rows wholly inside as one sub-grid, the rows cut by ``lo`` or ``hi``
        clipped recursively (so at most 2 x dims + 1 pieces, whatever the number of runs)."""
        first, last = self.span()
        if last <= lo or first >= hi or self.nbytes == 0:
            return []
        if not self.counts:
            a, b = max(first, lo), min(last, hi)
            return [(RunGrid(a, b - a), a - first)]
        count, stride = self.counts[0], self.strides[0]
        inner = RunGrid(self.start, self.run_len, self.counts[1:], self.strides[1:])
        in_lo, in_hi = inner.span()
        # Rows i whose span [in_lo + i*stride, in_hi + i*stride) overlaps / lies inside [lo, hi).
        touch0 = max(0, -(-(lo - in_hi + 1) // stride))
        touch1 = min(count, -(-(hi - in_lo) // stride))
        whole0 = max(0, -(-(lo - in_lo) // stride))
        whole1 = min(count, (hi - in_hi) // stride + 1)
        pieces = []
        if whole0 >= whole1:
            whole0 = whole1 = touch1
        for i in range(touch0, whole0):
            shifted = RunGrid(self.start + i * stride, self.run_len, inner.counts, inner.strides)
            pieces += [(g, i * inner.nbytes + o) for g, o in shifted.clip(lo, hi)]
        if whole1 > whole0:
            pieces.append(
                (
                    RunGrid(
                        self.start + whole0 * stride,
                        self.run_len,
                        (whole1 - whole0,) + inner.counts,
                        (stride,) + inner.strides,
                    ),
                    whole0 * inner.nbytes,
                )
            )
        for i in range(max(whole1, touch0), touch1):
            shifted = RunGrid(self.start + i * stride, self.run_len, inner.counts, inner.strides)
            pieces += [(g, i * inner.nbytes + o) for g, o in shifted.clip(lo, hi)]
        return pieces

    def split(self, max_bytes: int) -> list[tuple["RunGrid", int]]:
        """Pieces of at most ``max_bytes`` (a single run larger than that is cut too), each
        with the offset of its bytes in the box's buffer."""
        if self.nbytes <= max_bytes:
            return [(self, 0)]
        if not self.counts:
            return [
                (RunGrid(self.start + o, min(max_bytes, self.run_len - o)), o)
                for o in range(0, self.run_len, max_bytes)
            ]
        count, stride = self.counts[0], self.strides[0]
        inner = RunGrid(self.start, self.run_len, self.counts[1:], self.strides[1:])
        rows = max_bytes // inner.nbytes
        pieces = []
        if rows == 0:  # one outer step is already too large: cut inside it
            for i in range(count):
                shifted = RunGrid(self.start + i * stride, self.run_len, inner.counts, inner.strides)
                pieces += [(g, i * inner.nbytes + o) for g, o in shifted.split(max_bytes)]
            return pieces
        for i in range(0, count, rows):
            n = min(rows, count - i)
            pieces.append(
                (
                    RunGrid(self.start + i * stride, self.run_len, (n,) + inner.counts, (stride,) + inner.strides),
                    i * inner.nbytes,
                )
            )
        return pieces


def overlap(a_off, a_size, b_off, b_size):
    """The overlap (offsets, sizes) of two boxes, or None. Boxes with a zero-size dim overlap
    where the other box has that same empty extent (so empty tensors still map)."""
    lo, size = [], []
    for ao, an, bo, bn in zip(a_off, a_size, b_off, b_size):
        a, b = max(ao, bo), min(ao + an, bo + bn)
        if b < a or (b == a and (an or bn)):
            return None
        lo.append(a)
        size.append(b - a)
    return tuple(lo), tuple(size)


def box_runs(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], itemsize: int) -> RunGrid:
    """The runs of box (offsets, sizes) in a C-order tensor of ``shape``."""
    n = len(shape)
    if any(s == 0 for s in sizes):
        return RunGrid(0, 0)
    elem_strides = [1] * n
    for d in range(n - 2, -1, -1):
        elem_strides[d] = elem_strides[d + 1] * shape[d + 1]
    start = sum(o * s for o, s in zip(offsets, elem_strides)) * itemsize
    if n == 0:
        return RunGrid(0, itemsize)
    # k: the first dim after which every dim is full; each run spans dims k.. of the box.
    k = 0
    for d in range(n - 1, -1, -1):
        if sizes[d] != shape[d]:
            k = d
            break
    run_len = sizes[k] * elem_strides[k] * itemsize
    counts: list[int] = []
    strides: list[int] = []
    for d in range(k):
        if sizes[d] == 1:
            continue
        stride = elem_strides[d] * itemsize
        if counts and strides[-1] == sizes[d] * stride:  # a full dim continues the outer one
            counts[-1] *= sizes[d]
            strides[-1] = stride
        else:
            counts.append(sizes[d])
            strides.append(stride)
    return RunGrid(start, run_len, tuple(counts), tuple(strides))


def check_exact_cover(
    key: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...], str]]
) -> None:
    """Boxes (offsets, sizes, owner) must cover ``shape`` exactly once: inside the bounds, no
    overlap, no hole. ``owner`` names where a box comes from, for the error message."""
    total = math.prod(shape)
    for offsets, sizes, owner in boxes:
        if len(offsets) != len(shape) or any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise StateDictMismatchError(
                f"{key!r}: chunk at offsets {list(offsets)} sizes {list(sizes)} from {owner} lies "
                f"outside the tensor's shape {list(shape)}"
            )
    boxes = [b for b in boxes if math.prod(b[1]) > 0]
    if len(boxes) > 1:
        # Sweep along the dim with the most distinct chunk starts; only boxes whose ranges
        # meet on that dim can overlap.
        sweep = max(range(len(shape)), key=lambda d: len({b[0][d] for b in boxes})) if shape else 0
        ordered = sorted(boxes, key=lambda b: b[0][sweep] if shape else 0)
        active: list[tuple[tuple[int, ...], tuple[int, ...], str]] = []
        for box in ordered:
            lo = box[0][sweep] if shape else 0
            active = [a for a in active if (a[0][sweep] + a[1][sweep] if shape else 1) > lo]
            for other in active:
                if all(o1 < o2 + s2 and o2 < o1 + s1 for o1, s1, o2, s2 in zip(box[0], box[1], other[0], other[1])):
                    raise StateDictMismatchError(
                        f"{key!r}: chunk at offsets {list(box[0])} sizes {list(box[1])} from "
                        f"{box[2]} overlaps chunk at offsets {list(other[0])} sizes "
                        f"{list(other[1])} from {other[2]}; every element must be saved exactly "
                        f"once (two different tensors mapped to one key?)"
                    )
            active.append(box)
    covered = sum(math.prod(b[1]) for b in boxes)
    if covered != total:
        raise StateDictMismatchError(
            f"{key!r}: the chunks saved by all ranks cover {covered} of {total} elements of shape "
            f"{list(shape)}; part of the tensor would be missing from the checkpoint"
        )


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The elements ``[start, stop)`` of a row-major tensor of ``shape`` (a flat range, as a
    distributed optimizer holds of each parameter) as the fewest boxes (offsets, sizes), in
    order: each is a contiguous run of the range, so box i is the next ``prod(sizes)`` elements.
    At most 2 * (dims - 1) + 1 boxes: partial rows up to a whole row, whole rows, then the rest."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner  # the rows the range touches
    rest = shape[1:]
    if first == last:  # within one row
        return [((first, *o), (1, *s)) for o, s in flat_range_boxes(rest, start - first * inner, stop - first * inner)]
    out = []
    if start % inner:  # the end of the first row
        out += [((first, *o), (1, *s)) for o, s in flat_range_boxes(rest, start % inner, inner)]
        first += 1
    whole_end = last + 1 if stop % inner == 0 else last
    if whole_end > first:
        out.append(((first, *(0,) * len(rest)), (whole_end - first, *rest)))
    if stop % inner:  # the start of the last row
        out += [((last, *o), (1, *s)) for o, s in flat_range_boxes(rest, 0, stop % inner)]
    return out
