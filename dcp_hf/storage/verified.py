"""Verified reads: a store whose reads of a file with recorded digests (see
:mod:`dcp_hf.format.digests`) read whole blocks, check each against its digest, and only then
copy the bytes asked for out of it. The bytes a load uses are the bytes checked (never a second
read that a rewrite could slip between). A few checked blocks are kept, so reads of small
tensors side by side in one block read it once."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dcp_hf.boxes import RunGrid
from dcp_hf.errors import CheckpointFormatError
from dcp_hf.format.digests import ChecksumMismatchError, FileDigest, blocks_of, keys_in
from dcp_hf.format.header import read_header


@dataclass(frozen=True)
class _Handle:
    name: str
    inner: object


class VerifiedStore:
    """Wraps a store (``LocalStore``, ``FsspecStore``, ``S3Store``): the same interface, its
    handles carrying the file's name. Files without a recorded digest are read as they are.
    ``header_of(file)``: the file's header where it was read (to name the keys in an error)."""

    def __init__(
        self,
        store,
        digests: dict[str, FileDigest],
        header_of: Callable[[str], object],
        cached_blocks: int = 8,
    ):
        self.inner, self.digests, self.header_of = store, digests, header_of
        self.cached_blocks = cached_blocks
        self._cache: collections.OrderedDict[tuple[int, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str):  # where, exists, list, read (the index), remote, ...
        return getattr(self.inner, name)

    def open(self, name: str) -> _Handle:
        return _Handle(name, self.inner.open(name))

    def close(self, handle: _Handle) -> None:
        with self._lock:  # the handle's blocks go with it
            for key in [k for k in self._cache if k[0] == id(handle)]:
                del self._cache[key]
        self.inner.close(handle.inner)

    def size(self, handle: _Handle) -> int:
        return self.inner.size(handle.inner)

    def read_range(self, handle: _Handle, offset: int, length: int) -> bytes:
        digest = self.digests.get(handle.name)
        if digest is None:
            return self.inner.read_range(handle.inner, offset, length)
        end = min(offset + length, self.size(handle))
        out = bytearray()
        for b in blocks_of(offset, end, digest.block):
            lo = b * digest.block
            out += self._block(handle, b, digest)[max(offset, lo) - lo : end - lo]
        return bytes(out)

    def read_grid(self, handle: _Handle, name: str, base: int, grid: RunGrid, dst: memoryview) -> int:
        """The grid's runs into ``dst``, from checked blocks. Returns the bytes of the file read."""
        digest = self.digests.get(name)
        if digest is None:
            return self.inner.read_grid(handle.inner, name, base, grid, dst)
        lo, hi = grid.span()
        out = np.frombuffer(dst, dtype=np.uint8)
        for b in blocks_of(base + lo, base + hi, digest.block):
            block = np.frombuffer(self._block(handle, b, digest), dtype=np.uint8)
            b_lo = b * digest.block
            for g, at in grid.clip(b_lo - base, b_lo + len(block) - base):
                first = base + g.start - b_lo
                src = as_strided(block[first:], g.counts + (g.run_len,), g.strides + (1,), writeable=False)
                out[at : at + g.nbytes].reshape(src.shape)[...] = src
        return grid.nbytes

    def _block(self, handle: _Handle, b: int, digest: FileDigest) -> bytes:
        """Block ``b`` of the file, read whole and checked against its digest."""
        key = (id(handle), b)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        lo = b * digest.block
        want = max(0, min(digest.block, self.size(handle) - lo))
        data = self.inner.read_range(handle.inner, lo, want)
        where = self.inner.where(handle.name)
        if len(data) != want:
            raise CheckpointFormatError(f"{where}: short read at bytes {lo}-{lo + want} ({len(data)}); truncated?")
        got = digest.mismatch(b, data)
        if got is not None:
            header = self.header_of(handle.name)
            if header is None and b == 0:  # the header is being read: name the keys from these bytes
                try:
                    header = read_header(lambda off, n: data[off : off + n], where, self.size(handle))
                except CheckpointFormatError:
                    header = None
            keys = keys_in(header, lo, lo + want) if header is not None else []
            raise ChecksumMismatchError(digest.mismatch_message(where, b, len(data), got, keys))
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.cached_blocks:
                self._cache.popitem(last=False)
        return data
