"""Where checkpoint files live: a local/shared file system, or any fsspec URL (s3://, gs://,
memory://, ...). One small byte-range interface, so the reader is the same on both."""

from __future__ import annotations

import os
import random
import time
from typing import Any

from dcp_hf.boxes import RunGrid
from dcp_hf.errors import CheckpointFormatError
from dcp_hf.storage.posix import grid_span, read_runs


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def open_store(path: str | os.PathLike, storage_options: dict | None = None):
    path = os.fspath(path)
    if is_url(path):
        return FsspecStore(path, storage_options or {})
    return LocalStore(path.removeprefix("file://"))


class LocalStore:
    """A folder on a POSIX file system: positional reads straight into destination memory."""

    remote = False

    def __init__(self, root: str):
        self.root = root

    def __str__(self) -> str:
        return self.root

    def where(self, name: str) -> str:
        return os.path.join(self.root, name)

    def is_folder(self) -> bool:
        return os.path.isdir(self.root)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.where(name))

    def list(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def read(self, name: str) -> bytes:
        with open(self.where(name), "rb") as f:
            return f.read()

    def open(self, name: str) -> int:
        try:
            return os.open(self.where(name), os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.where(name)}: missing from the checkpoint") from None

    def close(self, handle: int) -> None:
        os.close(handle)

    def size(self, handle: int) -> int:
        return os.fstat(handle).st_size

    def read_range(self, handle: int, offset: int, length: int) -> bytes:
        return os.pread(handle, length, offset)

    def read_grid(self, handle: int, name: str, base: int, grid: RunGrid, dst: memoryview) -> int:
        return read_runs(handle, base, grid, dst, self.where(name))


class FsspecStore:
    """Objects behind an fsspec URL. Reads are ranged GETs, concurrent, with runs separated by
    less than ``coalesce_gap`` bytes fetched as one range; transient errors are retried with
    exponential backoff. Credentials and endpoints come from ``storage_options`` and the
    provider's standard chain (for S3: ``AWS_ENDPOINT_URL``, environment, profile)."""

    remote = True
    coalesce_gap = 1 << 20
    max_range = 16 << 20
    attempts = 5

    def __init__(self, url: str, storage_options: dict[str, Any]):
        import fsspec
        options = dict(storage_options)
        if url.startswith(("s3://", "s3a://")):
            # s3fs's default pool of 10 connections caps concurrent ranged reads.
            options.setdefault("config_kwargs", {}).setdefault("max_pool_connections", 64)
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        self.url = url.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _retry(self, what: str, fn, *args, **kwargs):
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError:
                raise
            except (OSError, TimeoutError) as e:  # throttling (503 SlowDown), dropped connections
                if attempt == self.attempts - 1:
                    raise OSError(f"{what}: {e}") from e
                time.sleep(min(8.0, 0.2 * 2 ** attempt) * (0.5 + random.random()))

    def is_folder(self) -> bool:
        return self._retry(self.url, self.fs.isdir, self.root)

    def exists(self, name: str) -> bool:
        return self._retry(self.where(name), self.fs.isfile, self._path(name))

    def list(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self._retry(self.url, self.fs.ls, self.root, detail=False))

    def read(self, name: str) -> bytes:
        return self._retry(self.where(name), self.fs.cat_file, self._path(name))

    def open(self, name: str) -> tuple[str, int]:
        try:
            size = self._retry(self.where(name), self.fs.size, self._path(name))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.where(name)}: missing from the checkpoint") from None
        return self._path(name), size

    def close(self, handle) -> None:
        pass

    def size(self, handle) -> int:
        return handle[1]

    def read_range(self, handle, offset: int, length: int) -> bytes:
        return self._retry(handle[0], self.fs.cat_file, handle[0], start=offset, end=offset + length)

    def read_grid(self, handle, name: str, base: int, grid: RunGrid, dst: memoryview) -> int:
        """Fetch the runs as coalesced ranges in one concurrent batch; copy each run out."""
        n = grid.run_len
        if grid.nbytes == 0:
            return 0
        ranges: list[list[int]] = []  # [start, end, first run, last run + 1]
        for i, start in enumerate(grid.starts()):
            s = base + start
            if ranges and s - ranges[-1][1] <= self.coalesce_gap and s + n - ranges[-1][0] <= self.max_range:
                ranges[-1][1], ranges[-1][3] = s + n, i + 1
            else:
                ranges.append([s, s + n, i, i + 1])
        blobs = self._retry(self.where(name), self.fs.cat_ranges, [handle[0]] * len(ranges),
                            [r[0] for r in ranges], [r[1] for r in ranges], on_error="raise")
        starts = grid.starts()
        for (lo, hi, first, last), blob in zip(ranges, blobs):
            if len(blob) != hi - lo:
                raise CheckpointFormatError(
                    f"{self.where(name)}: short read at bytes {lo}-{hi} ({len(blob)}); truncated?")
            view = memoryview(blob)
            for i in range(first, last):
                at = base + starts[i] - lo
                dst[i * n:(i + 1) * n] = view[at:at + n]
        return sum(r[1] - r[0] for r in ranges)
