"""Writing HF files to an object store (S3) from every rank in parallel, with no staging copy.

Each output file is one multipart upload, created by the coordinator. The file's bytes are cut
into parts (>= 5 MiB but the last, <= 10,000 parts); each part is assembled and uploaded by
the rank that holds most of its bytes, and the other ranks send it the rest over the process
group (an all-to-all per round; rounds bound the memory each rank holds). Parts upload
concurrently; the coordinator completes the uploads and writes the index last, and aborts
every upload when any rank fails, so a failed save leaves no object and no open upload.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from dcp_hf.errors import StorageError
from dcp_hf.storage.exchange import Part


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
