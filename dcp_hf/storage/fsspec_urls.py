"""The sink for any other fsspec URL (gs://, memory://, dir::..., ...): there is no multipart
upload, so each file is written in order through one open file by one rank, its owner (the
rank that holds most of it; the others send it their bytes, as for S3). A file appears when
its owner closes it; the index is still written last, and a failed save removes every file."""

from __future__ import annotations

import torch

from dcp_hf.boxes import byte_view
from dcp_hf.errors import StorageError
from dcp_hf.format import FileLayout
from dcp_hf.storage import commit
from dcp_hf.storage.exchange import Part


class FsspecSink:
    direct = False
    short_runs_cheap = False
    sequential = True
    min_part = 1
    max_parts = 1 << 62

    def __init__(self, store):
        self.store = store
        self.files: list[FileLayout] = []
        self.open_files: dict[str, object] = {}  # files this rank is writing

    def _call(self, name: str, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - every back end raises its own types
            raise StorageError(f"{self.store.where(name)}: {what}: {e}") from e

    # -- coordinator: before the ranks write -------------------------------------------------
    def prepare(self, save_id: str) -> None:
        pass

    def existing(self) -> list[str]:
        return self.store.names()

    def begin(self, files: list[FileLayout]) -> None:
        # The owner opens each file with its first part; the folder must exist for file
        # systems that have folders (object stores have none: a no-op there).
        self.files = files
        self._call(self.store.url, "create the folder", self.store.fs.makedirs, self.store.root, True)

    # -- every rank ----------------------------------------------------------------------------
    def open(self, opened, files: list[FileLayout], save_id: str, numbers: set[int]) -> None:
        self.files = files

    def write_runs(self, file, base, grid, src) -> None:
        raise NotImplementedError("fsspec files are written in order, by parts")

    def write_part(self, part: Part, data: torch.Tensor) -> None:
        name = self.files[part.file].name
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
        for f in self.files:
            got = self._call(f.name, "size", self.store.fs.size, self.store.path_of(f.name))
            if got != f.size:
                raise StorageError(f"{self.store.where(f.name)}: {got} bytes written, {f.size} expected")

    def put(self, name: str, data: bytes) -> None:
        commit.step(f"put {name}")
        self._call(name, "write", self.store.fs.pipe_file, self.store.path_of(name), data)

    def delete(self, name: str) -> None:
        commit.step(f"delete {name}")
        self._call(name, "delete", self.store.fs.rm_file, self.store.path_of(name))

    def publish(self, stale: set[str]) -> None:
        for name in sorted(stale):
            self.delete(name)

    def abort(self) -> None:
        for f in self.files:
            if self.store.fs.exists(self.store.path_of(f.name)):
                self.delete(f.name)
