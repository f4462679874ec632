"""The sink for any other fsspec URL (gs://, memory://, dir::..., ...): there is no multipart
upload, so each file is written in order through one open file by one rank, its owner (the
rank that holds most of it; the others send it their bytes, as for S3). A file appears when
its owner closes it; the index is still written last, and a failed save removes every file.
Shards get names no file has (``stored_names``), so only ``model.safetensors`` can be
replaced: it is written under a hidden name and moved over the old one last, as the commit."""

from __future__ import annotations

from typing import Any

import torch

from dcp_hf.boxes import byte_view
from dcp_hf.errors import StorageError
from dcp_hf.format import SINGLE_FILE_NAME, FileLayout
from dcp_hf.storage import commit
from dcp_hf.storage.exchange import Part
from dcp_hf.storage.local import PARTIAL, partial_name


class FsspecSink:
    direct = False
    short_runs_cheap = False
    sequential = True
    min_part = 1
    max_parts = 1 << 62

    def __init__(self, store):
        self.store = store
        self.files: list[FileLayout] = []
        self.open_files: dict[str, Any] = {}  # fsspec files this rank is writing
        self.save_id = ""
        self.before: set[str] = set()  # the folder's names when the save began
        self.staged: set[int] = set()  # files written under a hidden name (the name is taken)
        self.moved: set[int] = set()  # staged files already moved to their names

    def _call(self, name: str, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - every back end raises its own types
            raise StorageError(f"{self.store.where(name)}: {what}: {e}") from e

    # -- coordinator: before the ranks write -------------------------------------------------
    def prepare(self, save_id: str) -> None:
        self.save_id = save_id

    def existing(self) -> list[str]:
        names = self.store.names()
        for name in names:  # hidden files of an interrupted overwrite
            if PARTIAL.match(name):
                self.delete(name)
        self.before = {n for n in names if not PARTIAL.match(n)}
        return sorted(self.before)

    def begin(self, files: list[FileLayout]) -> set[int]:
        """The files that go under a hidden name (their name is taken); the owner opens each
        file with its first part. The folder must exist for file systems that have folders
        (object stores have none: a no-op there)."""
        self.files = files
        self.staged = {n for n, f in enumerate(files) if f.name in self.before}
        self._call(self.store.url, "create the folder", self.store.fs.makedirs, self.store.root, True)
        return set(self.staged)

    def _written_name(self, n: int) -> str:
        """Where file number ``n`` is written: its name, or a hidden one until ``complete``."""
        name = self.files[n].name
        return partial_name(name, self.save_id) if n in self.staged and n not in self.moved else name

    # -- every rank ----------------------------------------------------------------------------
    def open(self, opened: set[int], files: list[FileLayout], save_id: str, numbers: set[int]) -> None:
        self.files, self.save_id, self.staged = files, save_id, set(opened)

    def write_runs(self, file, base, grid, src) -> None:
        raise NotImplementedError("fsspec files are written in order, by parts")

    def write_part(self, part: Part, data: torch.Tensor) -> None:
        name = self._written_name(part.file)
        f = self.open_files.get(name)
        if f is None:
            f = self.open_files[name] = self._call(name, "open", self.store.fs.open, self.store.path_of(name), "wb")
        self._call(name, "write", f.write, bytes(byte_view(data)))

    def close(self) -> None:
        """Close (commit) the files this rank wrote."""
        while self.open_files:
            name, f = self.open_files.popitem()
            self._call(name, "close", f.close)

    def discard(self) -> None:
        """Drop the files this rank was writing without committing them."""
        while self.open_files:
            _, f = self.open_files.popitem()
            try:
                f.discard() if hasattr(f, "discard") else None
            except Exception:  # noqa: BLE001 - best effort after a failure
                pass

    # -- coordinator: the commit ---------------------------------------------------------------
    def complete(self, receipts) -> None:
        """Every file has its full size; then the staged ones replace the old files, except
        ``model.safetensors``, which commits a one-file checkpoint in ``publish``."""
        for n, f in enumerate(self.files):
            name = self._written_name(n)
            got = self._call(name, "size", self.store.fs.size, self.store.path_of(name))
            if got != f.size:
                raise StorageError(f"{self.store.where(f.name)}: {got} bytes written, {f.size} expected")
        for n in sorted(self.staged):
            if self.files[n].name != SINGLE_FILE_NAME:
                self._move(n)

    def _move(self, n: int) -> None:
        name = self._written_name(n)
        commit.step(f"move {self.files[n].name}")
        self._call(name, "move", self.store.fs.mv, self.store.path_of(name), self.store.path_of(self.files[n].name))
        self.moved.add(n)

    def put(self, name: str, data: bytes) -> None:
        commit.step(f"put {name}")
        self._call(name, "write", self.store.fs.pipe_file, self.store.path_of(name), data)

    def delete(self, name: str) -> None:
        commit.step(f"delete {name}")
        self._call(name, "delete", self.store.fs.rm_file, self.store.path_of(name))

    def publish(self, stale: set[str]) -> None:
        """``model.safetensors`` replaces the old one (or, switching to shards, goes first),
        then the replaced checkpoint's files are removed."""
        for n in sorted(self.staged - self.moved):
            self._move(n)
        for name in sorted(stale, key=lambda n: (n != SINGLE_FILE_NAME, n)):
            self.delete(name)

    def abort(self) -> None:
        """Remove what this save wrote: its new files and its hidden ones. Old files it
        already replaced stay replaced (their save id makes readers refuse the mix)."""
        for n in range(len(self.files)):
            if n in self.moved:
                continue
            name = self._written_name(n)
            if self.store.fs.exists(self.store.path_of(name)):
                self.delete(name)
