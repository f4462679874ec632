"""Writing HF files to an object store (S3) from every rank in parallel, with no staging copy.

Each output file is one multipart upload, created by the coordinator. The file's bytes are cut
into parts (>= 5 MiB but the last, <= 10,000 parts); each part is assembled and uploaded by
the rank that holds most of its bytes, and the other ranks send it the rest over the process
group (an all-to-all per round; rounds bound the memory each rank holds). Parts upload
concurrently; the coordinator completes the uploads and writes the index last, and aborts
every upload when any rank fails, so a failed save leaves no object and no open upload.
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcp_hf.boxes import RunGrid
from dcp_hf.errors import StorageError
from dcp_hf.storage.posix import byte_view, grid_span

MIN_PART = 5 << 20
MAX_PARTS = 10_000


@dataclass(frozen=True)
class Part:
    file: int  # file number
    number: int  # 1-based part number
    lo: int  # byte range [lo, hi) of the file
    hi: int
    owner: int
    round: int


def plan_parts(
    sizes: list[int],
    spans: list[list[tuple[int, int, int]]],
    part_size: int,
    round_bytes: int,
    whole_files: bool = False,
) -> list[Part]:
    """Parts of every file, each owned by the rank whose chunks overlap it most (with
    ``whole_files``: every part of a file by the rank that holds most of the file).

    ``sizes``: file sizes; ``spans[rank]``: (file, lo, hi) byte spans of that rank's chunks.
    Rounds group consecutive parts so that no rank owns more than ``round_bytes`` in one."""
    overlap: dict[tuple[int, int], dict[int, int]] = {}
    widths = [max(part_size, MIN_PART, -(-size // MAX_PARTS)) for size in sizes]
    for rank, rank_spans in enumerate(spans):
        for f, lo, hi in rank_spans:
            w = widths[f]
            for k in range(lo // w, (max(hi, lo + 1) - 1) // w + 1):
                bytes_in = min(hi, (k + 1) * w) - max(lo, k * w)
                cell = overlap.setdefault((f, k), {})
                cell[rank] = cell.get(rank, 0) + max(bytes_in, 0)
    if whole_files:
        for (f, _), votes in list(overlap.items()):
            total = overlap.setdefault((f, -1), {})
            for rank, n in votes.items():
                total[rank] = total.get(rank, 0) + n
    parts, round_no, load = [], 0, {}
    for f, size in enumerate(sizes):
        w = widths[f]
        for k in range(max(1, -(-size // w))):
            lo, hi = k * w, min(size, (k + 1) * w)
            votes = overlap.get((f, -1 if whole_files else k), {0: 0})
            owner = max(sorted(votes), key=lambda r: votes[r])
            if load.get(owner, 0) + (hi - lo) > round_bytes and load:
                round_no, load = round_no + 1, {}
            load[owner] = load.get(owner, 0) + hi - lo
            parts.append(Part(f, k + 1, lo, hi, owner, round_no))
    return parts


def make_target(store):
    """How a save writes to ``store``: S3 multipart uploads, files written in order through
    fsspec (other URLs), or None for a local folder (positional writes)."""
    if not store.remote:
        return None
    return S3Target(store) if hasattr(store, "client") else FsspecTarget(store)


class S3Target:
    """The multipart calls, through the S3Store's thread-safe botocore client (which retries
    throttling and dropped connections), so parts upload in parallel from several threads."""

    sequential = False  # parts of a file may come from any rank, in any order

    def __init__(self, store):
        self.store = store
        self.bucket, _, self.prefix = store.root.partition("/")

    def key(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}" if self.prefix else name

    def call(self, method: str, name: str | None, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        key = {"Key": self.key(name)} if name is not None else {}
        where = self.store.where(name) if name is not None else self.store.url
        try:
            return getattr(self.store.client(), method)(Bucket=self.bucket, **key, **kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise StorageError(
                    f"{where}: the bucket {self.bucket!r} does not exist (create it first, or check the endpoint)"
                ) from None
            raise StorageError(f"{where}: {method}: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"{where}: {method}: {e}") from e

    def create(self, name: str) -> str:
        return self.call("create_multipart_upload", name)["UploadId"]

    def upload_part(self, name: str, upload_id: str, number: int, data) -> str:
        return self.call("upload_part", name, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]

    def complete(self, name: str, upload_id: str, etags: list[tuple[int, str]], size: int | None = None) -> None:
        self.call(
            "complete_multipart_upload",
            name,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(etags)]},
        )

    def abort(self, name: str, upload_id: str) -> None:
        self.call("abort_multipart_upload", name, UploadId=upload_id)

    def put(self, name: str, data: bytes) -> None:
        self.call("put_object", name, Body=data)

    def delete(self, name: str) -> None:
        self.call("delete_object", name)

    def abort_leftovers(self) -> list[str]:
        """Abort the uploads still open under this checkpoint's prefix: leftovers of a save
        whose own aborts could not reach the store (e.g. it was down). Saving into the same
        path concurrently is not supported anyway."""
        prefix = self.key("")
        listing = self.call("list_multipart_uploads", None, Prefix=prefix)
        aborted = []
        for upload in listing.get("Uploads", []):
            name = upload["Key"][len(prefix) :]
            if "/" not in name:  # only this folder's objects
                self.call("abort_multipart_upload", name, UploadId=upload["UploadId"])
                aborted.append(upload["Key"])
        return aborted

    def close_local(self) -> None:
        pass

    def discard_local(self) -> None:
        pass


class FsspecTarget:
    """Any other fsspec URL (gs://, memory://, dir::..., ...): there is no multipart upload, so
    each file is written in order through one open file by one rank, its owner (the rank that
    holds most of it; the others send it their bytes as for S3). A file appears when its owner
    closes it; the index is still written last, and a failed save removes every file."""

    sequential = True  # all parts of a file from one rank, written in order

    def __init__(self, store):
        self.store = store
        self.open: dict[str, object] = {}  # files this rank is writing

    def _fs_call(self, name: str, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - every back end raises its own types
            raise StorageError(f"{self.store.where(name)}: {what}: {e}") from e

    def create(self, name: str) -> str:
        # The owner opens the file with its first part; the folder must exist for file
        # systems that have folders (object stores have none, so this is a no-op there).
        self._fs_call(name, "create the folder", self.store.fs.makedirs, self.store.root, True)
        return ""

    def upload_part(self, name: str, upload_id: str, number: int, data) -> str:
        f = self.open.get(name)
        if f is None:
            f = self.open[name] = self._fs_call(name, "open", self.store.fs.open, self.store._path(name), "wb")
        self._fs_call(name, "write", f.write, data)
        return ""

    def close_local(self) -> None:
        """Close (commit) the files this rank wrote."""
        while self.open:
            name, f = self.open.popitem()
            self._fs_call(name, "close", f.close)

    def discard_local(self) -> None:
        """Drop the files this rank was writing without committing them."""
        while self.open:
            _, f = self.open.popitem()
            try:
                f.discard() if hasattr(f, "discard") else None
            except Exception:  # noqa: BLE001 - best effort after a failure
                pass

    def complete(self, name: str, upload_id: str, etags, size: int | None = None) -> None:
        got = self._fs_call(name, "size", self.store.fs.size, self.store._path(name))
        if size is not None and got != size:
            raise StorageError(f"{self.store.where(name)}: {got} bytes written, {size} expected")

    def abort(self, name: str, upload_id: str) -> None:
        if self.store.fs.exists(self.store._path(name)):
            self.delete(name)

    def put(self, name: str, data: bytes) -> None:
        self._fs_call(name, "write", self.store.fs.pipe_file, self.store._path(name), data)

    def delete(self, name: str) -> None:
        self._fs_call(name, "delete", self.store.fs.rm_file, self.store._path(name))

    def abort_leftovers(self) -> list[str]:
        return []


@dataclass
class Contribution:
    """One run of bytes destined for a part: file byte offset and the bytes, a view into the
    tensor ``keep`` (held here so the memory outlives the view)."""

    file: int
    offset: int
    data: memoryview
    keep: torch.Tensor


def clip_runs(file: int, base: int, grid: RunGrid, tensor: torch.Tensor, lo: int, hi: int):
    """The pieces of the grid's runs (at file offset ``base``; bytes from the contiguous
    ``tensor``) that fall inside [lo, hi)."""
    n = grid.run_len
    src = byte_view(tensor)
    span_lo, span_hi = grid_span(grid)
    if base + span_hi <= lo or base + span_lo >= hi or n == 0:
        return
    for i, start in enumerate(grid.starts()):
        a, b = max(base + start, lo), min(base + start + n, hi)
        if a < b:
            s = i * n + a - (base + start)
            yield Contribution(file, a, src[s : s + b - a], tensor)


def exchange(outgoing: dict[int, list[Contribution]], group, world: int) -> list[Contribution]:
    """Send each owner its contributions; return those sent to this rank (one all-to-all for
    the sizes, one for (file, offset, length) triples, one for the bytes)."""
    meta_out, data_out, counts = [], [], torch.zeros(world, 2, dtype=torch.int64)
    for rank in range(world):
        items = outgoing.get(rank, [])
        counts[rank, 0] = 3 * len(items)
        counts[rank, 1] = sum(len(c.data) for c in items)
        meta_out += [v for c in items for v in (c.file, c.offset, len(c.data))]
        data_out += [c.data for c in items]
    counts_in = torch.empty_like(counts)
    dist.all_to_all_single(counts_in, counts, group=group)
    meta_in = torch.empty(int(counts_in[:, 0].sum()), dtype=torch.int64)
    dist.all_to_all_single(
        meta_in, torch.tensor(meta_out, dtype=torch.int64), counts_in[:, 0].tolist(), counts[:, 0].tolist(), group=group
    )
    data_send = torch.empty(int(counts[:, 1].sum()), dtype=torch.uint8)
    at = 0
    view = byte_view(data_send)
    for chunk in data_out:
        view[at : at + len(chunk)] = chunk
        at += len(chunk)
    data_in = torch.empty(int(counts_in[:, 1].sum()), dtype=torch.uint8)
    dist.all_to_all_single(data_in, data_send, counts_in[:, 1].tolist(), counts[:, 1].tolist(), group=group)
    received, at, triples = [], 0, meta_in.view(-1, 3).tolist()
    data_view = byte_view(data_in)
    for f, off, n in triples:
        received.append(Contribution(f, off, data_view[at : at + n], data_in))
        at += n
    return received


def assemble(part: Part, header: bytes, pieces: list[Contribution]) -> bytearray:
    """The part's bytes from the header and the pieces; every byte must be covered once (the
    copy is needed: botocore sends bytes, not views)."""
    buf = bytearray(part.hi - part.lo)
    view = memoryview(buf)
    filled = 0
    if part.lo < len(header):
        n = min(len(header), part.hi) - part.lo
        view[:n] = header[part.lo : part.lo + n]
        filled += n
    for c in pieces:
        view[c.offset - part.lo : c.offset - part.lo + len(c.data)] = c.data
        filled += len(c.data)
    if filled != len(buf):
        raise RuntimeError(
            f"part {part.number} of file {part.file}: {filled} of {len(buf)} bytes "
            f"arrived; not uploading an incomplete part"
        )
    return buf


def part_of(parts_by_file: dict[int, list[Part]], file: int, offset: int) -> Part:
    parts = parts_by_file[file]
    return parts[bisect.bisect_right([p.lo for p in parts], offset) - 1]


class Uploader:
    """Uploads parts from a pool of threads while the caller assembles the next ones, across
    rounds; at most ``max_bytes`` of parts are in flight (``submit`` waits for room). The first
    failed upload is raised by the next ``submit`` or by ``etags``."""

    def __init__(self, target, names: dict[int, str], uploads: dict[int, str], threads: int, max_bytes: int):
        self.target, self.names, self.uploads, self.max_bytes = target, names, uploads, max_bytes
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dcp-hf-upload")
        self.room = threading.Condition()
        self.in_flight = 0
        self.error: BaseException | None = None
        self.futures = []

    def submit(self, part: Part, data) -> None:
        n = len(data)
        with self.room:
            while self.error is None and self.in_flight and self.in_flight + n > self.max_bytes:
                self.room.wait()
            if self.error is not None:
                raise self.error
            self.in_flight += n
        self.futures.append(self.pool.submit(self._upload, part, data, n))

    def _upload(self, part: Part, data, n: int) -> tuple[int, int, str]:
        try:
            etag = self.target.upload_part(self.names[part.file], self.uploads[part.file], part.number, data)
            return part.file, part.number, etag
        except BaseException as e:
            with self.room:
                self.error = self.error or e
            raise
        finally:
            with self.room:
                self.in_flight -= n
                self.room.notify_all()

    def etags(self) -> list[tuple[int, int, str]]:
        """Wait for every upload; (file, part number, etag) of each."""
        return [f.result() for f in self.futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
