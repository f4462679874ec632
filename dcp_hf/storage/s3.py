"""The S3 sink: each file is one multipart upload, created by the coordinator; parts come from
any rank, in any order, uploaded concurrently through the store's thread-safe botocore client
(which retries throttling and dropped connections). The coordinator completes the uploads
(each object appears whole, atomically) and writes the index last; on failure it aborts every
upload, so a failed save leaves no object and no open upload."""

from __future__ import annotations

import logging

import torch

from dcp_hf.boxes import byte_view
from dcp_hf.format import SINGLE_FILE_NAME, FileLayout
from dcp_hf.storage import commit
from dcp_hf.storage.exchange import Part

logger = logging.getLogger("dcp_hf")

MIN_PART = 5 << 20
MAX_PARTS = 10_000


class S3Sink:
    direct = False
    short_runs_cheap = False
    sequential = False
    min_part = MIN_PART
    max_parts = MAX_PARTS

    def __init__(self, store):
        self.store = store
        self.bucket = store.bucket
        self.files: list[FileLayout] = []
        self.uploads: dict[int, str] = {}  # file number -> upload id
        self.receipts: dict[int, list[tuple[int, str | None]]] = {}

    def key(self, name: str) -> str:
        return self.store.key(name)

    def call(self, method: str, name: str | None, **kwargs):
        """One request, bounded and its errors mapped as every S3 request is (the store's)."""
        key = {"Key": self.key(name)} if name is not None else {}
        return self.store.request(
            name, method, getattr(self.store.client(), method), Bucket=self.bucket, **key, **kwargs
        )

    # -- coordinator: before the ranks write -------------------------------------------------
    def prepare(self, save_id: str) -> None:
        """Abort the uploads still open under this checkpoint's prefix: leftovers of a save
        whose own aborts could not reach the store (e.g. it was down). Saving into the same
        path concurrently is not supported anyway."""
        prefix = self.key("")
        listing = self.call("list_multipart_uploads", None, Prefix=prefix)
        for upload in listing.get("Uploads", []):
            name = upload["Key"][len(prefix) :]
            if "/" not in name:  # only this folder's objects
                self.call("abort_multipart_upload", name, UploadId=upload["UploadId"])

    def existing(self) -> list[str]:
        return self.store.names()

    def begin(self, files: list[FileLayout]) -> dict[int, str]:
        self.files = files
        try:
            for n, f in enumerate(files):
                self.uploads[n] = self.call("create_multipart_upload", f.name)["UploadId"]
        except BaseException:
            self.abort()
            raise
        return dict(self.uploads)

    # -- every rank ----------------------------------------------------------------------------
    def open(self, opened: dict[int, str], files: list[FileLayout], save_id: str, numbers: set[int]) -> None:
        self.files, self.uploads = files, dict(opened)

    def write_runs(self, file, base, grid, src) -> None:
        raise NotImplementedError("S3 takes whole parts")

    def write_part(self, part: Part, data: torch.Tensor) -> str:
        name, body = self.files[part.file].name, bytes(byte_view(data))  # botocore sends bytes, not views
        return self.call("upload_part", name, UploadId=self.uploads[part.file], PartNumber=part.number, Body=body)[
            "ETag"
        ]

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass

    # -- coordinator: the commit ---------------------------------------------------------------
    def complete(self, receipts: dict[int, list[tuple[int, str | None]]]) -> None:
        """Every object but ``model.safetensors`` appears (under names no object had: see
        ``stored_names``); that one commits a one-file checkpoint, in ``publish``."""
        self.receipts = receipts
        for n, f in enumerate(self.files):
            if f.name != SINGLE_FILE_NAME:
                self._complete(n)

    def _complete(self, n: int) -> None:
        name = self.files[n].name
        commit.step(f"complete {name}")
        parts = [{"PartNumber": number, "ETag": etag} for number, etag in sorted(self.receipts.get(n, []))]
        self.call("complete_multipart_upload", name, UploadId=self.uploads[n], MultipartUpload={"Parts": parts})
        del self.uploads[n]

    def put(self, name: str, data: bytes) -> None:
        commit.step(f"put {name}")
        self.call("put_object", name, Body=data)

    def delete(self, name: str) -> None:
        commit.step(f"delete {name}")
        self.call("delete_object", name)

    def publish(self, stale: set[str]) -> None:
        """The commit as on a file system: ``model.safetensors`` appears (or, switching to
        shards, goes first), then the replaced checkpoint's objects are removed."""
        for n in list(self.uploads):
            self._complete(n)
        for name in sorted(stale, key=lambda n: (n != SINGLE_FILE_NAME, n)):
            self.delete(name)

    def abort(self) -> None:
        for n, upload_id in list(self.uploads.items()):
            try:
                self.call("abort_multipart_upload", self.files[n].name, UploadId=upload_id)
            except Exception:  # best effort: report the original failure
                logger.warning("could not abort the upload of %s", self.files[n].name, exc_info=True)
            del self.uploads[n]
