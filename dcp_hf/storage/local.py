"""The local/shared file system sink: ranks write straight into the final files with
positional writes, under hidden names in the checkpoint folder itself; the coordinator gives
them their names (names no file has: see ``HFStorageWriter``'s naming), then commits with one
atomic rename of the index (or of ``model.safetensors``) and removes the replaced checkpoint's
files. Nothing else in the folder, nor the folder itself, is touched (see :mod:`.commit`)."""

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
from dcp_hf.format.index import CHECKPOINT_FILE, SINGLE_FILE_NAME
from dcp_hf.storage import commit
from dcp_hf.storage.commit import fsync_dir
from dcp_hf.storage.exchange import Part
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
        self.folder = ""  # the checkpoint folder, symlinks resolved (the coordinator's, from ``begin``)
        self.made_folder = False  # ``begin`` created it
        self.before: set[str] = set()  # the folder's checkpoint files when the save began
        self.committing = False  # the commit record is written: visible names may have changed
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
            commit.clean_leftovers(self.path)  # the staging folders of earlier versions
            if os.path.isdir(self.path):
                commit.finish_commit(os.path.realpath(self.path))
                commit.remove_own_hidden(os.path.realpath(self.path))
        except BaseException:
            self.abort()
            raise

    def existing(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        refuse_odd_checkpoint_entries(self.path, names)
        self.before = {n for n in names if CHECKPOINT_FILE.match(n)}
        return names

    def begin(self, files: list[FileLayout]) -> Created:
        """Create every file in the folder (made if missing) under a hidden name
        (``O_EXCL|O_NOFOLLOW``)."""
        self.files = files
        self.folder = os.path.realpath(self.path)
        self.made_folder = not os.path.isdir(self.folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise StorageError(e.errno, f"creating {self.folder}: {e.strerror}") from e
        ids = []
        for n, f in enumerate(files):
            path = os.path.join(self.folder, partial_name(f.name, self.save_id))
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
            raise StorageError(f"{self.folder}: its files are on different devices; not writing there")
        return Created(self.folder, ids[0].dev if ids else 0, [i.ino for i in ids])

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
        """Every file has its full size: record the commit, then give each file its name (a
        name no file has, so nothing a reader may be reading changes), except
        ``model.safetensors``, which commits a one-file checkpoint in ``publish``."""
        for f in self.files:
            try:
                size = os.lstat(os.path.join(self.folder, partial_name(f.name, self.save_id))).st_size
            except FileNotFoundError:
                size = None
            if size != f.size:
                raise StorageError(
                    f"{os.path.join(self.folder, f.name)}: expected {f.size} bytes after all "
                    f"ranks wrote, found {size}; not committing the checkpoint"
                )
        commit.begin_commit(self.folder, self.save_id, self.before)
        self.committing = True
        for f in self.files:
            if f.name != SINGLE_FILE_NAME:
                commit.step(f"name {f.name}")
                commit.place(
                    os.path.join(self.folder, partial_name(f.name, self.save_id)), os.path.join(self.folder, f.name)
                )
        fsync_dir(self.folder)

    def put(self, name: str, data: bytes) -> None:
        commit.write_new_file(self.folder, name, data)

    def delete(self, name: str) -> None:
        commit.remove_checkpoint_file(self.folder, name)

    def publish(self, stale: set[str]) -> None:
        """The commit of a one-file checkpoint: its rename over ``model.safetensors``; of a
        switch from one file to shards: removing ``model.safetensors``, which transformers
        loads before an index (a sharded save's index, put last, commits it otherwise). Then
        the replaced checkpoint's files (``stale``, the files the record lists that the new
        one does not name) are removed, and the record."""
        if any(f.name == SINGLE_FILE_NAME for f in self.files):
            commit.step(f"rename {SINGLE_FILE_NAME}")
            os.rename(
                os.path.join(self.folder, partial_name(SINGLE_FILE_NAME, self.save_id)),
                os.path.join(self.folder, SINGLE_FILE_NAME),
            )
        elif SINGLE_FILE_NAME in stale:
            self.delete(SINGLE_FILE_NAME)
        fsync_dir(self.folder)
        commit.finish_commit(self.folder)  # removes the rest of ``stale``
        self.committing = False
        self._release()

    def abort(self) -> None:
        """A failed save: undo what it changed (its visible files, from the commit record) and
        remove its hidden files, then release the lock; the folder keeps its checkpoint. Best
        effort: whatever is left, the next save into the folder finishes first."""
        try:
            if self.committing:
                commit.finish_commit(self.folder)
                self.committing = False
            if self.folder:
                for f in self.files:
                    try:
                        os.unlink(os.path.join(self.folder, partial_name(f.name, self.save_id)))
                    except FileNotFoundError:
                        pass
                if self.made_folder and not os.listdir(self.folder):
                    os.rmdir(self.folder)  # the failed first save leaves no folder it made
        except OSError:
            logger.warning("could not remove what a failed save left in %s", self.path, exc_info=True)
        finally:
            self._release()

    def _release(self) -> None:
        commit.release_lock(self.lock, self.save_id)
        self.lock = None
