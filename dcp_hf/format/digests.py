"""Block digests of checkpoint files: a CRC-32C of every ``BLOCK`` bytes of each file, recorded
in the index's ``metadata`` at save time, checked by verified loads and ``dcp-hf verify``.

Why CRC-32C. Ranks write disjoint byte ranges of one file at once (chunks side by side,
interleaved column shards, parts), so no rank sees a whole block, and hashing after the write
would be a second pass over the file. A CRC is linear over GF(2): the CRC of a block is the XOR
of the CRCs of its pieces, each with the other ranks' bytes taken as zeros and shifted to the
block's end (a multiplication by x^(8n) mod P). So each rank hashes exactly the bytes it
writes, while it writes them, sends one 32-bit sum per block it touched, and the coordinator
XORs them: the digests are the CRC-32C of each block, whatever the sharding, the same as any
CRC-32C library computes over the stored bytes. Cryptographic hashes (SHA-256, BLAKE2, BLAKE3)
and xxHash cannot be combined that way; hardware CRC-32C is also the fastest of those measured
(README, "Checksums"). It detects changed bytes, not tampering (whoever can rewrite a file can
rewrite the index and its digests too).

In the index: ``metadata["dcp_hf_digests"] = {file: {"algo": "crc32c", "block": N, "digests":
["1a2b3c4d", ...]}}`` (hex, one per block, the last block may be shorter).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import crc32c
import numpy as np
from numpy.lib.stride_tricks import as_strided

from dcp_hf.boxes import RunGrid
from dcp_hf.errors import CheckpointFormatError

DIGESTS_KEY = "dcp_hf_digests"
ALGO = "crc32c"
BLOCK = 4 << 20  # bytes per digest: a verified read of a few bytes reads at most this much more
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reflected
_ONES = 0xFFFFFFFF


def crc(data) -> int:
    """The standard CRC-32C of ``data`` (what a block's recorded digest is)."""
    return crc32c.crc32c(data)


def _linear_crc(data) -> int:
    """The CRC register after ``data`` from 0, without the final inversion: linear in the bytes
    (a zero prefix leaves it 0), so the sums of pieces combine by XOR."""
    return crc32c.crc32c(data, _ONES) ^ _ONES


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (bit-reflected; a != 0), as zlib's ``multmodp``."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod P, k = 0, 1, ...
for _ in range(63):
    _X2N.append(_multiply(_X2N[-1], _X2N[-1]))


@functools.cache
def _times_table(k: int) -> tuple[tuple[int, ...], ...]:
    """Multiplication by x^(2^k) as four byte tables (the product is linear in its argument)."""
    c = _X2N[k]
    return tuple(tuple(_multiply(c, b << (8 * j)) for b in range(256)) for j in range(4))


def shift(value: int, nbytes: int) -> int:
    """The linear CRC register ``value`` after ``nbytes`` more zero bytes: value * x^(8n)."""
    k = 3
    while nbytes and value:
        if nbytes & 1:
            t = _times_table(k)
            value = t[0][value & 255] ^ t[1][(value >> 8) & 255] ^ t[2][(value >> 16) & 255] ^ t[3][value >> 24]
        nbytes >>= 1
        k += 1
    return value


def blocks_of(lo: int, hi: int, block: int = BLOCK) -> range:
    """The numbers of the blocks that bytes [lo, hi) touch."""
    return range(lo // block, (hi - 1) // block + 1) if hi > lo else range(0)


class BlockSums:
    """One rank's share of the digests of a save: per (file, block), the XOR of the linear CRCs
    of the bytes this rank wrote there (each shifted to the block's end) and their count.
    ``add`` is called from the writer's threads with the bytes as they are written."""

    def __init__(self, sizes: list[int], block: int = BLOCK, on: bool = True):
        self.sizes, self.block, self.on = sizes, block, on
        self.sums: dict[tuple[int, int], tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._zeros = threading.local()  # per writer thread: a zeroed buffer for interleaved runs

    def add(self, file: int, base: int, grid: RunGrid, data) -> None:
        """The grid's bytes ``data`` (in order), whose tensor data starts at byte ``base``.
        Nothing is hashed when off (a save without digests)."""
        if not self.on:
            return
        lo, hi = grid.span()
        data = memoryview(data).cast("B")
        for b in blocks_of(base + lo, base + hi, self.block):
            b_lo = b * self.block
            b_hi = min(b_lo + self.block, self.sizes[file])
            value, count = 0, 0
            for g, at in grid.clip(b_lo - base, b_hi - base):
                g_lo, g_hi = g.span()
                if g.counts:  # runs with others' bytes between: those count as zeros
                    value ^= shift(self._scattered_crc(g, data[at : at + g.nbytes]), b_hi - (base + g_hi))
                else:
                    value ^= shift(_linear_crc(data[at : at + g.nbytes]), b_hi - (base + g_hi))
                count += g.nbytes
            self._merge(file, b, value, count)

    def _scattered_crc(self, g: RunGrid, data) -> int:
        """The linear CRC of the grid's span, its runs from ``data`` and zeros between, built in
        this thread's zeroed buffer (zeroed again after: no fresh pages per block)."""
        g_lo, g_hi = g.span()
        span = getattr(self._zeros, "buffer", None)
        if span is None or len(span) < g_hi - g_lo:
            span = self._zeros.buffer = np.zeros(max(g_hi - g_lo, self.block), dtype=np.uint8)
        dst = as_strided(span, g.counts + (g.run_len,), g.strides + (1,), writeable=True)
        dst[...] = np.frombuffer(data, dtype=np.uint8).reshape(dst.shape)
        try:
            return _linear_crc(span[: g_hi - g_lo].data)  # the array's memory, no copy
        finally:
            dst[...] = 0

    def add_bytes(self, file: int, offset: int, data) -> None:
        """Contiguous bytes at ``offset`` (a header, a part)."""
        self.add(file, offset, RunGrid(0, len(data)), data)

    def _merge(self, file: int, b: int, value: int, count: int) -> None:
        with self._lock:
            old, n = self.sums.get((file, b), (0, 0))
            self.sums[(file, b)] = (old ^ value, n + count)


@dataclass(frozen=True)
class FileDigest:
    """The recorded digests of one file: ``digests[k]`` is the CRC-32C of bytes
    [k * block, (k + 1) * block)."""

    block: int
    digests: tuple[int, ...]
    algo: str = ALGO

    def mismatch(self, b: int, data) -> int | None:
        """None when block ``b`` reads as ``data``, else the digest ``data`` has."""
        got = crc(data)
        return None if b < len(self.digests) and got == self.digests[b] else got

    def mismatch_message(self, where: str, b: int, nbytes: int, got: int, keys: list[str]) -> str:
        lo = b * self.block
        recorded = f"{self.digests[b]:08x}" if b < len(self.digests) else "none (past the recorded size)"
        return (
            f"{where}: bytes {lo}-{lo + nbytes} (block {b}{'; ' + named(keys) if keys else ''}) read with "
            f"{self.algo} {got:08x}, but the save recorded {recorded}: the file was changed after it was written"
        )

    def encode(self) -> dict:
        return {"algo": self.algo, "block": self.block, "digests": [f"{d:08x}" for d in self.digests]}


def named(keys: list[str], most: int = 4) -> str:
    """``key 'a'`` / ``keys 'a', 'b' and 3 more``."""
    shown = ", ".join(repr(k) for k in keys[:most])
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"key {shown}" if len(keys) == 1 else f"keys {shown}{more}"


def keys_in(header, lo: int, hi: int) -> list[str]:
    """The tensors of a file (its ``FileHeader``) whose data lies in bytes [lo, hi); the header
    first if it does."""
    data_start = min((t.start for t in header.tensors.values()), default=hi)
    keys = [k for k, t in sorted(header.tensors.items(), key=lambda kv: kv[1].start) if t.start < hi and t.end > lo]
    return (["the header"] if lo < data_start else []) + keys


class ChecksumMismatchError(CheckpointFormatError):
    """Bytes read differ from the digest recorded at save: the file changed after the save."""


def combine(rank_sums: list[dict], names: list[str], sizes: list[int], block: int = BLOCK) -> dict[str, FileDigest]:
    """Every file's digests from all ranks' ``BlockSums.sums``. Every byte must have been
    hashed exactly once (the counts say so), else the save is refused naming the file."""
    totals: dict[tuple[int, int], list[int]] = {}
    for sums in rank_sums:
        for key, (value, count) in sums.items():
            t = totals.setdefault(key, [0, 0])
            t[0] ^= value
            t[1] += count
    out = {}
    for n, (name, size) in enumerate(zip(names, sizes)):
        digests = []
        for b in blocks_of(0, size, block):
            length = min(block, size - b * block)
            value, count = totals.get((n, b), (0, 0))
            if count != length:
                raise CheckpointFormatError(
                    f"{name}: the ranks hashed {count} of the {length} bytes of block {b} while writing; "
                    f"not committing a checkpoint whose digests would be wrong"
                )
            digests.append(value ^ shift(_ONES, length) ^ _ONES)  # the standard CRC of the block
        out[name] = FileDigest(block, tuple(digests))
    return out


def encode_digests(digests: dict[str, FileDigest]) -> dict:
    return {name: d.encode() for name, d in sorted(digests.items())}


def decode_digests(metadata: object, where: str) -> dict[str, FileDigest]:
    """The digests an index's ``metadata`` records (none for checkpoints of other tools or of
    older versions), validated."""
    raw = metadata.get(DIGESTS_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{where}: metadata {DIGESTS_KEY!r} must map file names to digests")
    out = {}
    for name, rec in raw.items():
        try:
            if rec["algo"] != ALGO:
                raise CheckpointFormatError(f"{where}: {name}: unknown digest algorithm {rec['algo']!r}")
            block, digests = rec["block"], tuple(int(d, 16) for d in rec["digests"])
            if not isinstance(block, int) or block <= 0:
                raise ValueError(f"block {block!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{where}: {DIGESTS_KEY} of {name!r} is malformed ({e})") from None
        out[name] = FileDigest(block, digests)
    return out
