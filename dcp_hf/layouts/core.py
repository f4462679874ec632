"""Layouts: how in-memory tensors relate to the tensors of an HF checkpoint.

A layout maps each in-memory key (and its global shape) to *pieces*: a box of the in-memory
tensor that is a box of one HF tensor, possibly through a permutation of dims (a transpose) and
with in-memory dims of extent 1 dropped (the expert dim of a merged tensor). The same pieces
serve saving (write items in HF key space, each resolved to a view of the local shard) and
loading (read items in HF key space, each resolved to a view of the destination), so nothing
is ever materialized in full and every direction uses one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import torch

from dcp_hf.boxes import overlap
from dcp_hf.errors import StateDictMismatchError
from dcp_hf.format import TensorSpec


class Overlap(NamedTuple):
    """Where a piece meets an in-memory box: the common box, in-memory (``mem_offsets``,
    ``mem_sizes``) and in the HF tensor (``hf_offsets``, ``hf_sizes``, HF dim order)."""

    mem_offsets: tuple[int, ...]
    mem_sizes: tuple[int, ...]
    hf_offsets: tuple[int, ...]
    hf_sizes: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """Box ``sizes`` (HF dim order) at ``hf_offsets`` of HF tensor ``hf_key`` equals the box of
    the in-memory tensor at ``mem_offsets``: HF dim i runs along in-memory dim ``mem_dims[i]``;
    every other in-memory dim has extent 1 in the box."""

    hf_key: str
    hf_shape: tuple[int, ...]
    sizes: tuple[int, ...]
    hf_offsets: tuple[int, ...]
    mem_offsets: tuple[int, ...]
    mem_dims: tuple[int, ...]

    @staticmethod
    def whole(hf_key: str, shape: tuple[int, ...]) -> "Piece":
        n = len(shape)
        return Piece(hf_key, tuple(shape), tuple(shape), (0,) * n, (0,) * n, tuple(range(n)))

    def mem_extent(self, dim: int) -> int:
        return self.sizes[self.mem_dims.index(dim)] if dim in self.mem_dims else 1

    def intersect(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Overlap | None:
        """The overlap with the in-memory box (offsets, sizes), or None where they do not meet."""
        extents = [1] * len(offsets)
        for m, n in zip(self.mem_dims, self.sizes):
            extents[m] = n
        hit = overlap(self.mem_offsets, extents, offsets, sizes)
        if hit is None:
            return None
        lo, size = hit
        hf_off = tuple(self.hf_offsets[i] + lo[m] - self.mem_offsets[m] for i, m in enumerate(self.mem_dims))
        hf_size = tuple(size[m] for m in self.mem_dims)
        return Overlap(tuple(lo), tuple(size), hf_off, hf_size)


def mem_view(local: torch.Tensor, lo, size, mem_dims) -> torch.Tensor:
    t = local
    for d, (o, n) in enumerate(zip(lo, size)):
        t = t.narrow(d, o, n)
    for d in sorted(set(range(local.dim())) - set(mem_dims), reverse=True):
        t = t.select(d, 0)
    kept = sorted(mem_dims)
    return t.permute([kept.index(m) for m in mem_dims])


class Rule(Protocol):
    """One declarative transform. ``pieces`` gets an HF-named key (renames applied) and the
    in-memory global shape; ``collect`` claims HF tensors and says which in-memory tensors they
    make up (popping the claimed keys from ``specs``)."""

    def pieces(self, key: str, shape: tuple[int, ...]) -> list[Piece] | None: ...

    def collect(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]: ...


@dataclass(frozen=True)
class Rename:
    """Replace the substring ``memory`` of in-memory keys with ``hf`` (and back). ``prefix``:
    only at the start of the key; an HF key without the prefix is outside the layout, unless
    ``others_kept`` (then every key without it keeps its name on both sides)."""

    memory: str
    hf: str
    prefix: bool = False
    keep: tuple[str, ...] = ()  # with ``prefix``: keys starting with one of these stay as they are
    others_kept: bool = False

    def to_hf(self, key: str) -> str:
        if self.prefix:
            if self.keep and key.startswith(self.keep):
                return key
            return self.hf + key[len(self.memory) :] if key.startswith(self.memory) else key
        return key.replace(self.memory, self.hf) if self.memory else key

    def to_memory(self, key: str) -> str | None:
        if self.prefix:
            if key.startswith(self.hf):
                return self.memory + key[len(self.hf) :]
            return key if self.others_kept or (self.keep and key.startswith(self.keep)) else None
        return key.replace(self.hf, self.memory) if self.hf else key


def Prefix(memory: str, hf: str, keep: tuple[str, ...] = ()) -> Rename:  # noqa: N802 - reads as a rule name
    """In-memory keys start with ``memory``, HF keys with ``hf`` (e.g. a wrapper's ``model.``);
    keys starting with one of ``keep`` have the same name on both sides."""
    return Rename(memory, hf, prefix=True, keep=tuple(keep))


@dataclass(frozen=True)
class Layout:
    """Renames applied to every key, then the first rule that matches; a key that no rule
    matches is stored under its (renamed) key as it is, unless ``strict``. ``quantization``
    (:mod:`dcp_hf.layouts.quantized`): how the HF tensors the pieces name may be stored
    quantized (they load dequantized)."""

    rules: tuple = ()
    renames: tuple[Rename, ...] = ()
    strict: bool = False
    name: str = field(default="identity", compare=False)
    quantization: Any = None

    def to_hf_key(self, key: str) -> str:
        for r in self.renames:
            key = r.to_hf(key)
        return key

    def to_memory_key(self, key: str) -> str | None:
        for r in reversed(self.renames):
            key = r.to_memory(key)
            if key is None:
                return None
        return key

    def pieces(self, key: str, shape: tuple[int, ...]) -> list[Piece]:
        hf_key = self.to_hf_key(key)
        for rule in self.rules:
            found = rule.pieces(hf_key, tuple(shape))
            if found is not None:
                return found
        if self.strict:
            raise StateDictMismatchError(f"{key!r}: no rule of layout {self.name!r} covers this key")
        return [Piece.whole(hf_key, tuple(shape))]

    def memory_specs(self, hf_specs: dict[str, TensorSpec]) -> tuple[dict[str, TensorSpec], list[str]]:
        """The in-memory tensors an HF checkpoint's tensors make up, and the HF keys that lie
        outside the layout (e.g. ``talker.*`` when the layout keeps ``thinker.*``)."""
        remaining = dict(hf_specs)
        if self.quantization is not None:  # quantized data + scales -> their logical tensors
            remaining.update(self.quantization.collect(remaining))
        made: dict[str, TensorSpec] = {}
        for rule in self.rules:
            made.update(rule.collect(remaining))
        if self.strict and remaining:
            raise StateDictMismatchError(f"no rule of layout {self.name!r} covers {sorted(remaining)[:5]}")
        made.update(remaining)
        out, outside, source = {}, [], {}
        for key, spec in made.items():
            mem_key = self.to_memory_key(key)
            if mem_key is None:
                outside.append(key)
                continue
            # Two HF keys with one in-memory name, or a name that saves under another key,
            # would lose or misplace a tensor.
            if mem_key in out or self.to_hf_key(mem_key) != key:
                other = source.get(mem_key, self.to_hf_key(mem_key))
                raise StateDictMismatchError(
                    f"layout {self.name!r} cannot name HF tensor {key!r} in memory: its in-memory "
                    f"name {mem_key!r} is that of {other!r}"
                )
            out[mem_key], source[mem_key] = TensorSpec(mem_key, spec.dtype, spec.shape), key
        return out, outside

    def without_renames(self) -> "Layout":
        return replace(self, renames=())


IDENTITY = Layout()
