"""The local/shared file system sink: ranks write straight into the final files with
positional writes, in a hidden staging folder beside the destination, and the coordinator
commits it with one atomic exchange of the whole folder (see :mod:`.commit`)."""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dcp_hf.boxes import RunGrid, byte_view
from dcp_hf.errors import StorageError
from dcp_hf.format import FileLayout
from dcp_hf.format.index import CHECKPOINT_FILE
from dcp_hf.storage import commit
from dcp_hf.storage.exchange import Part
from dcp_hf.storage.commit import fsync_dir
from dcp_hf.storage.posix import maps_short_runs, pwrite_all, start_writeback, write_runs

logger = logging.getLogger("dcp_hf")
PARTIAL = re.compile(r"^\.(.+)\.([0-9a-f]{12})\.partial$")


def partial_name(name: str, save_id: str) -> str:
    return f".{name}.{save_id}.partial"


def refuse_odd_checkpoint_entries(path: str, names: list[str]) -> None:
    """A folder (or FIFO, socket, device) at a checkpoint file's name is not a checkpoint file
    to replace: refuse naming it rather than set it aside with the old checkpoint."""
    for name in names:
        if CHECKPOINT_FILE.match(name):
            mode = os.lstat(os.path.join(path, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
                raise StorageError(
                    errno.EEXIST,
                    f"{os.path.join(path, name)}: is {kind} where the checkpoint has a file; not "
                    f"replacing it: move it away to save into {path}",
                )


class _Span(NamedTuple):
    """Bytes [lo, hi) of file number ``file``, stored once this rank had written ``written_by``."""

    file: int
    lo: int
    hi: int
    written_by: int


@dataclass(frozen=True)
class Created:
    """What ranks need to open the files the coordinator created."""

    work: str  # the folder the files are built in
    dev: int  # the device of the folder (every file's)
    inodes: list[int]  # each file's inode, as created (compact: a plan goes to every rank)

    def ident(self, n: int) -> commit.FileId:
        return commit.FileId(self.dev, self.inodes[n])


class LocalSink:
    direct = True
    sequential = False
    short_runs_cheap = True  # until ``begin`` finds the file system cannot map them
    min_part = 1
    max_parts = 1 << 62
    WRITEBACK_LAG = 64 << 20

    def __init__(self, path: str):
        self.path = path
        self.save_id = ""
        self.files: list[FileLayout] = []
        self.lock: str | None = None
        self.dest: commit.Destination | None = None
        self.fds: dict[int, int] = {}
        self.work = ""
        self.written = 0  # bytes this rank wrote into interleaved spans
        self.behind: collections.deque[_Span] = collections.deque()
        self.lock_behind = threading.Lock()

    # -- coordinator: before the ranks write -------------------------------------------------
    def prepare(self, save_id: str) -> None:
        self.save_id = save_id
        self.lock = commit.acquire_lock(self.path, save_id)
        try:
            commit.clean_leftovers(self.path)
        except BaseException:
            self.abort()
            raise

    def existing(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for name in names:  # partial files of an interrupted in-place save
            if PARTIAL.match(name):
                os.unlink(os.path.join(self.path, name))
        names = [n for n in names if not PARTIAL.match(n)]
        refuse_odd_checkpoint_entries(self.path, names)
        return names

    def begin(self, files: list[FileLayout]) -> Created:
        """Make the staging folder and create every file in it (``O_EXCL|O_NOFOLLOW``)."""
        self.files = files
        self.dest = commit.prepare(self.path, self.save_id)
        ids = []
        for n, f in enumerate(files):
            path = os.path.join(self.dest.work, partial_name(f.name, self.save_id))
            try:
                fd, ident = commit.create_file(path)
                ids.append(ident)
                try:
                    if n == 0:
                        self.short_runs_cheap = maps_short_runs(fd)  # may reserve a block: ENOSPC
                finally:
                    os.close(fd)
            except OSError as e:
                raise StorageError(e.errno, f"creating {path}: {e.strerror}") from e
        if len({i.dev for i in ids}) > 1:
            raise StorageError(f"{self.dest.work}: its files are on different devices; not writing there")
        return Created(self.dest.work, ids[0].dev if ids else 0, [i.ino for i in ids])

    # -- every rank ----------------------------------------------------------------------------
    def open(self, opened: Created, files: list[FileLayout], save_id: str, numbers: set[int]) -> None:
        self.files, self.save_id, self.work = files, save_id, opened.work
        for n in sorted(numbers):
            self.fds[n] = commit.open_created(self._partial(n), opened.ident(n))

    def _partial(self, n: int) -> str:
        return os.path.join(self.work, partial_name(self.files[n].name, self.save_id))

    def _error(self, n: int, e: OSError, what: str) -> StorageError:
        return StorageError(e.errno, f"{what} {os.path.join(self.path, self.files[n].name)}: {e.strerror}")

    def write_runs(self, file: int, base: int, grid: RunGrid, src: memoryview) -> None:
        try:
            write_runs(self.fds[file], base, grid, src)
        except OSError as e:
            raise self._error(file, e, "writing") from e
        lo, hi = grid.span()
        if grid.nbytes == hi - lo:  # the span is this rank's alone
            start_writeback(self.fds[file], base + lo, hi - lo)
        else:
            self._interleaved_written(file, base + lo, base + hi, grid.nbytes)

    def _interleaved_written(self, file: int, lo: int, hi: int, nbytes: int) -> None:
        """Start writeback of spans other ranks write into too (column shards) only once this
        rank has written ``WRITEBACK_LAG`` bytes more: a page written back before every rank
        stored its runs in it goes to disk twice (4-rank column save: 1.93x the bytes with no
        lag). Ranks write the tensors in the same order at about the same pace, so by then
        the others are done with it; the fsync at the end takes whatever is left."""
        due = []
        with self.lock_behind:  # the writer's threads
            self.written += nbytes
            self.behind.append(_Span(file, lo, hi, self.written))
            while self.behind and self.behind[0].written_by + self.WRITEBACK_LAG <= self.written:
                due.append(self.behind.popleft())
        for span in due:
            start_writeback(self.fds[span.file], span.lo, span.hi - span.lo)

    def write_part(self, part: Part, data: torch.Tensor) -> None:
        try:
            pwrite_all(self.fds[part.file], byte_view(data), part.lo)
        except OSError as e:
            raise self._error(part.file, e, "writing") from e
        start_writeback(self.fds[part.file], part.lo, part.hi - part.lo)

    def close(self) -> None:
        try:
            for n, fd in self.fds.items():
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise self._error(n, e, "syncing") from e
        finally:
            self._close_fds()

    def discard(self) -> None:
        for n in list(self.fds):
            try:
                os.unlink(self._partial(n))
            except OSError:
                pass
        self._close_fds()

    def _close_fds(self) -> None:
        self.behind.clear()
        while self.fds:
            os.close(self.fds.popitem()[1])

    # -- coordinator: the commit ---------------------------------------------------------------
    def complete(self, receipts) -> None:
        """Every file has its full size: name them (still invisible when staged)."""
        work = self.dest.work
        for f in self.files:
            try:
                size = os.lstat(os.path.join(work, partial_name(f.name, self.save_id))).st_size
            except FileNotFoundError:
                size = None
            if size != f.size:
                raise StorageError(
                    f"{os.path.join(self.dest.path, f.name)}: expected {f.size} bytes after all "
                    f"ranks wrote, found {size}; not committing the checkpoint"
                )
        for f in self.files:
            commit.step(f"rename {f.name}")
            os.rename(os.path.join(work, partial_name(f.name, self.save_id)), os.path.join(work, f.name))
        fsync_dir(work)

    def put(self, name: str, data: bytes) -> None:
        commit.write_new_file(self.dest.work, name, data)

    def delete(self, name: str) -> None:
        if not self.dest.staged:  # a staged save replaces the whole folder: nothing to delete
            commit.step(f"remove {name}")
            os.unlink(os.path.join(self.dest.work, name))

    def publish(self, stale: set[str]) -> None:
        """Make the folder the new checkpoint: one exchange of the staging folder, or (no
        staging possible) remove the replaced files that the new save did not write again."""
        if self.dest.staged:
            commit.commit(self.dest, self.save_id)
        else:
            for name in sorted(stale):
                self.delete(name)
            fsync_dir(self.dest.work)
        self._release()

    def abort(self) -> None:
        """A failed save: remove what it built (the staging folder, or this save's partial
        files in place) and release the lock; the destination keeps its checkpoint. Best
        effort: whatever is left, the next save into the folder removes first."""
        try:
            if self.dest is not None and self.dest.staged:
                commit.clean_leftovers(self.path)
            elif self.dest is not None:
                for f in self.files:
                    try:
                        os.unlink(os.path.join(self.dest.work, partial_name(f.name, self.save_id)))
                    except FileNotFoundError:
                        pass
        except OSError:
            logger.warning("could not remove what a failed save left beside %s", self.path, exc_info=True)
        finally:
            self._release()

    def _release(self) -> None:
        commit.release_lock(self.lock, self.save_id)
        self.lock = None
