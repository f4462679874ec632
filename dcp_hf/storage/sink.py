"""Where a save's bytes go: the ``Sink`` protocol, one implementation per back end.

``HFStorageWriter`` keeps the DCP protocol, the file layout and the one commit sequence; a
sink does the back end's part of each step. Call order (``HFStorageWriter`` drives it):

coordinator, in ``prepare_global_plan``:
    ``prepare(save_id)``  take the destination (lock, finish interrupted saves, abort leftovers)
    ``existing()``        names already there (the writer refuses to replace them unless asked)
    ``begin(files)``      create the files or uploads; returns what ranks need to open them
                          (and learns whether short runs are cheap to write there)
every rank, in ``write_data``:
    ``open(opened, numbers)``, then ``write_runs`` (if ``direct``) and ``write_part``, then
    ``close()`` (durable), or ``discard()`` on failure
coordinator, in ``finish``:
    ``complete(receipts)`` every file whole; ``put`` side files, the index last; ``delete``;
    ``publish(stale)`` makes the new checkpoint the folder's; on any failure ``abort()``.
"""

from __future__ import annotations

from typing import Any, Protocol

from dcp_hf.boxes import RunGrid
from dcp_hf.format import FileLayout
from dcp_hf.storage.exchange import Part


class Sink(Protocol):
    direct: bool  # ranks may write their own runs at any offset of a file (else only parts)
    sequential: bool  # a file is written in order by one rank (all its parts have one owner)
    short_runs_cheap: bool  # ranks write short interleaved runs at full speed (known after ``begin``)
    min_part: int  # smallest part (a file's last may be smaller)
    max_parts: int  # most parts per file

    def prepare(self, save_id: str) -> None: ...

    def existing(self) -> list[str]: ...

    def begin(self, files: list[FileLayout]) -> Any: ...

    def open(self, opened: Any, files: list[FileLayout], save_id: str, numbers: set[int]) -> None: ...

    def write_runs(self, file: int, base: int, grid: RunGrid, src: memoryview) -> None: ...

    def write_part(self, part: Part, data) -> str | None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...

    def complete(self, receipts: dict[int, list[tuple[int, str | None]]]) -> None: ...

    def put(self, name: str, data: bytes) -> None: ...

    def delete(self, name: str) -> None: ...

    def publish(self, stale: set[str]) -> None: ...

    def abort(self) -> None: ...


def open_sink(store) -> Sink:
    """The sink for ``store`` (see :func:`dcp_hf.storage.stores.open_store`)."""
    if not store.remote:
        from dcp_hf.storage.local import LocalSink

        return LocalSink(store.root)
    if hasattr(store, "client"):
        from dcp_hf.storage.s3 import S3Sink

        return S3Sink(store)
    from dcp_hf.storage.fsspec_urls import FsspecSink

    return FsspecSink(store)
