"""Save plans that stay small at scale: each rank's chunks as a few blocks, merged once.

A rank's write items are grouped into *blocks*: the keys (a :mod:`.keysets` code) that share
global shape, dtype and chunk box. A rank of an FSDP2 job holding a row slice of each of 90k
DeepSeek-V3 tensors sends ~20 blocks of a few hundred bytes each instead of 91k write items; a
Megatron rank sends one block per distinct shard shape. The coordinator merges the blocks of
all ranks in time proportional to the number of distinct key sets and blocks, not to ranks x
tensors: it builds the global table (key -> shape, dtype; ranks must agree), checks that the
boxes of every tensor cover it exactly once, and decides which holder of a replicated box
writes it. What each rank is told back is as small: which of its blocks to drop or thin out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

import torch

from dcp_hf.boxes import Box, check_exact_cover
from dcp_hf.contract.keysets import KeyCode, decode_keys, encode_keys
from dcp_hf.errors import StateDictMismatchError
from dcp_hf.format.index import TensorSpec, natural_key

DROP = "drop"  # a block this rank does not write (another replica does)


@dataclass(frozen=True)
class Block:
    """Keys of one global shape and dtype whose chunk on this rank is the same box.
    ``sources``: digest of the in-memory tensors the keys come from, in key order (replicas
    of a box must agree on it), empty where each key is its own source; ``count``: the number
    of keys, checked when decoding."""

    keys: KeyCode
    count: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    sources: bytes


class BoxWriter(NamedTuple):
    """``rank`` writes ``box`` of each of the tensors ``keys``."""

    keys: list[str]
    box: Box
    rank: int


@dataclass
class LocalSummary:
    """What a rank sends to the coordinator: its blocks (in a fixed order it keeps)."""

    blocks: list[Block]


class ChunkEntry(NamedTuple):
    """A chunk a rank saves: a box (``offsets``, ``sizes``) of HF tensor ``key`` (global
    ``shape``, ``dtype``), taken from the in-memory tensor ``source``."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    source: str


def summarize(entries: Iterable[ChunkEntry]) -> tuple[LocalSummary, list[list[str]]]:
    """Group a rank's chunks into blocks; also return each block's keys (sorted). Chunks with
    no elements are left out unless the whole tensor is empty (it must still be saved)."""
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for key, shape, dtype, offsets, sizes, source in entries:
        if 0 in sizes and 0 not in shape:
            continue
        groups.setdefault((tuple(shape), dtype, tuple(offsets), tuple(sizes)), []).append((key, source))
    blocks, keys = [], []
    for (shape, dtype, offsets, sizes), members in groups.items():
        members.sort()  # one order on every rank (replicas compare source digests)
        for (a, _), (b, _) in zip(members, members[1:]):
            if a == b:
                raise StateDictMismatchError(f"{a!r}: two chunks at offsets {list(offsets)} on one rank")
        digest = (
            b""
            if all(k == s for k, s in members)
            else hashlib.sha1("\n".join(s for _, s in members).encode()).digest()[:8]
        )
        blocks.append(Block(encode_keys(k for k, _ in members), len(members), shape, dtype, offsets, sizes, digest))
        keys.append([k for k, _ in members])
    return LocalSummary(blocks), keys


@dataclass
class RankAssignment:
    """What the coordinator tells one rank: per block index, ``DROP`` or the code of the keys
    to keep; blocks not named are written whole. ``merged`` is the coordinator's own view and
    is not sent."""

    only: dict[int, str | KeyCode] = field(default_factory=dict)
    merged: "MergedPlan | None" = None

    def __getstate__(self):
        return {"only": self.only, "merged": None}

    def keeps(self, block: int, keys: list[str]) -> list[str]:
        rule = self.only.get(block)
        if rule is None:
            return keys
        if rule == DROP:
            return []
        kept = set(decode_keys(rule))  # type: ignore[arg-type]  # a KeyCode: DROP is handled above
        return [k for k in keys if k in kept]


@dataclass
class _Holder:
    rank: int
    block: int
    entry: Block


@dataclass
class _Group:
    """Keys held by exactly the same blocks: one coverage check and one assignment for all.
    ``writers``: box -> [(holder, slice)]: the holder writes ``keys[slice]`` of this group's
    keys in that box (replicas of a box split the keys; ``slice(None)`` is all of them)."""

    keys: list[str]
    writers: dict[Box, list[tuple[_Holder, slice]]]
    codes: dict[tuple, KeyCode] = field(default_factory=dict)  # slice -> code of its keys

    def code(self, part: slice) -> KeyCode:
        """The code of a slice of the keys; replicas of every box share the slices, so each is
        encoded once however many boxes there are."""
        span = part.indices(len(self.keys))
        if span not in self.codes:
            self.codes[span] = encode_keys(self.keys[part])
        return self.codes[span]


class MergedPlan:
    """The coordinator's merge of every rank's summary (see the module doc)."""

    def __init__(self, summaries: list[LocalSummary], lowest_rank: bool = False):
        self.summaries = summaries
        self.key_lists: list[list[str]] = []  # per distinct key set, natural order
        self.block_set: dict[tuple[int, int], int] = {}  # (rank, block) -> key set id
        holders: dict[int, list[_Holder]] = {}
        ids: dict[KeyCode, int] = {}
        for rank, summary in enumerate(summaries):
            for b, block in enumerate(summary.blocks):
                kid = ids.get(block.keys)
                if kid is None:
                    keys = sorted(decode_keys(block.keys), key=natural_key)
                    if len(keys) != block.count:
                        raise StateDictMismatchError(
                            f"rank {rank}: a block of {block.count} keys decodes to {len(keys)}"
                        )
                    kid = ids[block.keys] = len(self.key_lists)
                    self.key_lists.append(keys)
                self.block_set[rank, b] = kid
                holders.setdefault(kid, []).append(_Holder(rank, b, block))
        self.table = self._table(holders)
        self.groups: list[_Group] = []
        self.group_of: dict[str, int] = {}
        self._assign(holders, lowest_rank)

    def _table(self, holders: dict[int, list[_Holder]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        table: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        first: dict[str, int] = {}
        for kid, hs in holders.items():
            seen = set()
            for h in hs:
                spec = (h.entry.shape, h.entry.dtype)
                if spec in seen:
                    continue
                seen.add(spec)
                for key in self.key_lists[kid]:
                    known = table.setdefault(key, spec)
                    rank = first.setdefault(key, h.rank)
                    if known != spec:
                        raise StateDictMismatchError(
                            f"{key!r}: ranks disagree on the tensor: rank {rank} has shape "
                            f"{list(known[0])} {known[1]}, rank {h.rank} has shape {list(spec[0])} {spec[1]}"
                        )
        return table

    def _assign(self, holders: dict[int, list[_Holder]], lowest_rank: bool) -> None:
        member: dict[str, list[int]] = {}
        for kid, keys in enumerate(self.key_lists):
            for key in keys:
                member.setdefault(key, []).append(kid)
        by_signature: dict[tuple[int, ...], list[str]] = {}
        for key, member_of in member.items():
            by_signature.setdefault(tuple(member_of), []).append(key)
        for kids, keys in by_signature.items():
            if len(kids) > 1:  # keys of one key set are in its (natural) order already
                keys.sort(key=natural_key)
            by_box: dict[Box, list[_Holder]] = {}
            for kid in kids:
                for h in holders[kid]:
                    by_box.setdefault(Box(h.entry.offsets, h.entry.sizes), []).append(h)
            for hs in by_box.values():
                hs.sort(key=lambda h: (h.rank, h.block))
            shape = self.table[keys[0]][0]
            check_exact_cover(keys[0], shape, [(off, size, f"rank {hs[0].rank}") for (off, size), hs in by_box.items()])
            writers: dict[Box, list] = {}
            n = len(keys)
            for i, (box, hs) in enumerate(sorted(by_box.items())):
                self._check_sources(keys[0], box, hs)
                if len(hs) == 1 or lowest_rank:
                    writers[box] = [(hs[0], slice(None))]
                    continue
                # Replicas split the keys: the j-th slice goes to holder (i + j) mod R, so
                # every replica writes, also where there are fewer keys than replicas.
                r = len(hs)
                writers[box] = [
                    (hs[(i + j) % r], slice(j * n // r, (j + 1) * n // r))
                    for j in range(r)
                    if (j + 1) * n // r > j * n // r
                ]
            gid = len(self.groups)
            self.groups.append(_Group(keys, writers))
            for key in keys:
                self.group_of[key] = gid
        self._only = self._rank_rules()

    def _check_sources(self, key: str, box: Box, hs: list[_Holder]) -> None:
        """Replicas of a box must save it from the same in-memory tensors (comparable where
        their blocks hold the same keys; sources equal to the keys always agree)."""
        first: dict[int, _Holder] = {}
        for h in hs:
            other = first.setdefault(self.block_set[h.rank, h.block], h)
            if other.entry.sources != h.entry.sources:
                raise StateDictMismatchError(
                    f"HF tensor {key!r} at {list(box[0])} is saved by rank {other.rank} and rank "
                    f"{h.rank} from different in-memory tensors: two different tensors map to one key"
                )

    def _rank_rules(self) -> dict[int, dict[int, str | KeyCode]]:
        """Per rank, per block that does not write all its keys: DROP or the keys it keeps."""
        written: dict[tuple[int, int], list[tuple[_Group, slice]]] = {}
        for g in self.groups:
            for hs in g.writers.values():
                for h, part in hs:
                    written.setdefault((h.rank, h.block), []).append((g, part))
        rules: dict[int, dict[int, str | KeyCode]] = {}
        for (rank, b), kid in self.block_set.items():
            parts = written.get((rank, b))
            if parts is None:
                rules.setdefault(rank, {})[b] = DROP
            elif len(parts) == 1 and parts[0][1] != slice(None):
                rules.setdefault(rank, {})[b] = parts[0][0].code(parts[0][1])
            elif sum(len(g.keys[part]) for g, part in parts) != len(self.key_lists[kid]):
                rules.setdefault(rank, {})[b] = encode_keys(k for g, part in parts for k in g.keys[part])
        return rules

    # -- queries ----------------------------------------------------------------------------
    def assignment(self, rank: int) -> RankAssignment:
        return RankAssignment(dict(self._only.get(rank, {})), self)

    def writer_of(self, key: str, point: tuple[int, ...]) -> int:
        """The rank that writes the element at ``point`` of ``key`` (of an empty tensor: the
        rank that saves it)."""
        g = self.groups[self.group_of[key]]
        for (off, size), hs in g.writers.items():
            if 0 in size or all(o <= p < o + s for p, o, s in zip(point, off, size)):
                for h, part in hs:
                    if key in g.keys[part]:
                        return h.rank
        raise KeyError(key)

    def writers(self) -> Iterator[BoxWriter]:
        """Every box written and who writes it (one entry per distinct box and writer, not per
        key)."""
        for g in self.groups:
            for (offsets, sizes), hs in g.writers.items():
                for h, part in hs:
                    yield BoxWriter(g.keys if part == slice(None) else g.keys[part], Box(offsets, sizes), h.rank)


def encode_table(specs: Iterable[TensorSpec]) -> dict[tuple, KeyCode]:
    """Every tensor of a checkpoint, compactly: (shape, dtype) -> code of its keys."""
    by_spec: dict[tuple, list[str]] = {}
    for s in specs:
        by_spec.setdefault((tuple(s.shape), s.dtype), []).append(s.key)
    return {spec: encode_keys(keys) for spec, keys in by_spec.items()}


def decode_table(table: dict[tuple, KeyCode]) -> list[TensorSpec]:
    """The tensors of an encoded table, in natural key order."""
    specs = [TensorSpec(key, dtype, shape) for (shape, dtype), code in table.items() for key in decode_keys(code)]
    return sorted(specs, key=lambda s: natural_key(s.key))
