"""Where checkpoint files live: a local/shared file system, or any fsspec URL (s3://, gs://,
memory://, ...). One small byte-range interface, so the reader is the same on both."""

from __future__ import annotations

import builtins  # the stores have a list() method
import os
import random
import socket
import stat
import threading
import time
from typing import Any

from dcp_hf.boxes import RunGrid
from dcp_hf.errors import CheckpointFormatError, MixedCheckpointError, StorageError
from dcp_hf.extras import require
from dcp_hf.storage.posix import read_runs

# S3 defaults, so a server that accepts connections and never answers is an error naming the
# URL within about a minute: per request (botocore's attempts x read timeout), and s3fs's own
# retry loop reduced to one pass. Override through storage_options["config_kwargs"] (botocore
# Config keys: connect_timeout, read_timeout, retries={"max_attempts": N}).
S3_CONNECT_TIMEOUT = 10
S3_READ_TIMEOUT = 20
S3_ATTEMPTS = 3
# Every S3 GET's body must arrive whole within this many seconds (a body trickling in pieces
# each within the read timeout would otherwise run unbounded); storage_options["request_deadline"].
S3_REQUEST_DEADLINE = 120.0


def _is_timeout(error: BaseException) -> bool:
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def open_store(path: str | os.PathLike, storage_options: dict | None = None):
    path = os.fspath(path)
    if path.startswith(("s3://", "s3a://")):
        require("s3fs", "s3", f"{path}: an s3:// path", load=False)
        return S3Store(path, storage_options or {})
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
        return os.path.lexists(self.where(name))  # what is there is checked when opened

    def missing_hint(self) -> str:
        from dcp_hf.storage.commit import moved_aside

        old = moved_aside(self.root)
        return (
            (
                f" (an interrupted save left the previous checkpoint at {old}; the next save "
                f"into {self.root} puts it back)"
            )
            if old
            else ""
        )

    def list(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def read(self, name: str) -> bytes:
        fd = self.open(name)
        try:
            size, at = os.fstat(fd).st_size, 0
            chunks: list[bytes] = []
            while True:
                chunk = os.pread(fd, max(size - at, 1 << 16), at)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                at += len(chunk)
        finally:
            os.close(fd)

    def open(self, name: str) -> int:
        """Open a file for reading; a FIFO, device or folder at the name is refused (opening
        never blocks) and a symlink is followed (the HF hub cache links its files)."""
        path = self.where(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{path}: missing from the checkpoint") from None
        except OSError as e:
            raise CheckpointFormatError(f"{path}: cannot be opened: {e.strerror}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = {
                stat.S_IFDIR: "a folder",
                stat.S_IFIFO: "a FIFO",
                stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device",
            }.get(stat.S_IFMT(mode), "not a regular file")
            raise CheckpointFormatError(f"{path}: is {kind}, not a regular file; not reading it")
        os.set_blocking(fd, True)
        return fd

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
            config = options["config_kwargs"] = dict(options.get("config_kwargs") or {})
            # s3fs's default pool of 10 connections caps concurrent ranged reads.
            config.setdefault("max_pool_connections", 64)
            config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
            config.setdefault("read_timeout", S3_READ_TIMEOUT)
            config.setdefault("retries", {"max_attempts": S3_ATTEMPTS, "mode": "adaptive"})
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        if isinstance(getattr(self.fs, "retries", None), int):
            self.fs.retries = 1  # s3fs's own loop would multiply botocore's attempts
        self.fs.invalidate_cache(self.root)  # fsspec shares instances: listings may be stale
        self.url = url.rstrip("/")
        self.options = options

    def __str__(self) -> str:
        return self.url

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def missing_hint(self) -> str:
        return ""

    def path_of(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _retry(self, what: str, fn, *args, **kwargs):
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError:
                raise
            except (OSError, TimeoutError) as e:  # throttling (503 SlowDown), dropped connections
                if _is_timeout(e):  # the client already waited and retried
                    raise StorageError(f"{what}: no answer from the server ({e})") from e
                if attempt == self.attempts - 1:
                    raise StorageError(f"{what}: {e}") from e
                time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))

    def is_folder(self) -> bool:
        return self._retry(self.url, self.fs.isdir, self.root)

    def exists(self, name: str) -> bool:
        return self._retry(self.where(name), self.fs.isfile, self.path_of(name))

    def list(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self._retry(self.url, self.fs.ls, self.root, detail=False))

    def names(self) -> builtins.list[str]:
        """The folder's entries; none where there is no folder (yet)."""
        try:
            return self.list() if self.is_folder() else []
        except FileNotFoundError:
            return []

    def read(self, name: str) -> bytes:
        try:
            return self._retry(self.where(name), self.fs.cat_file, self.path_of(name))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.where(name)}: missing from the checkpoint") from None

    def open(self, name: str) -> tuple:  # a handle: (path, size), and the ETag on S3
        try:
            size = self._retry(self.where(name), self.fs.size, self.path_of(name))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.where(name)}: missing from the checkpoint") from None
        return self.path_of(name), size

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
        ranges: builtins.list[builtins.list[int]] = []  # [start, end, first run, last run + 1]
        for i, start in enumerate(grid.starts()):
            s = base + start
            if ranges and s - ranges[-1][1] <= self.coalesce_gap and s + n - ranges[-1][0] <= self.max_range:
                ranges[-1][1], ranges[-1][3] = s + n, i + 1
            else:
                ranges.append([s, s + n, i, i + 1])
        if len(ranges) == 1 and ranges[0][3] - ranges[0][2] == 1:  # one run: straight into dst
            self._fetch_into(handle, name, ranges[0][0], ranges[0][1], dst)
            return ranges[0][1] - ranges[0][0]
        blobs = self._fetch(handle, name, [(r[0], r[1]) for r in ranges])
        starts = grid.starts()
        for (lo, hi, first, last), blob in zip(ranges, blobs):
            if len(blob) != hi - lo:
                raise CheckpointFormatError(
                    f"{self.where(name)}: short read at bytes {lo}-{hi} ({len(blob)}); truncated?"
                )
            view = memoryview(blob)
            for i in range(first, last):
                at = base + starts[i] - lo
                dst[i * n : (i + 1) * n] = view[at : at + n]
        return sum(r[1] - r[0] for r in ranges)

    def _fetch(self, handle, name: str, ranges: builtins.list[tuple[int, int]]) -> builtins.list[bytes | bytearray]:
        return self._retry(
            self.where(name),
            self.fs.cat_ranges,
            [handle[0]] * len(ranges),
            [a for a, _ in ranges],
            [b for _, b in ranges],
            on_error="raise",
        )

    def _fetch_into(self, handle, name: str, a: int, b: int, dst: memoryview) -> None:
        blob = self._fetch(handle, name, [(a, b)])[0]
        if len(blob) != b - a:
            raise CheckpointFormatError(f"{self.where(name)}: short read at bytes {a}-{b}; truncated?")
        dst[:] = blob


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


class S3Store(FsspecStore):
    """S3 through a thread-safe botocore client from the reader's threads, so many responses
    are read in parallel (s3fs serves every request from one asyncio loop thread, which caps
    throughput on few cores), every request bounded the same way: botocore's connect and read
    timeouts and attempts for the request, a deadline for the body, a body cut short retried
    with backoff. Listings and existence checks too: a request that gets no answer is an
    error naming the URL, never a silent "not there" (s3fs's ``isfile`` answers False)."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        options = dict(storage_options)
        self.request_deadline = float(options.pop("request_deadline", S3_REQUEST_DEADLINE))
        super().__init__(url, options)
        self.storage_options = options
        self._client = None
        self.bucket, _, self.prefix = self.root.partition("/")

    # -- metadata: existence, listing, small whole objects ----------------------------------------
    def exists(self, name: str) -> bool:
        try:
            self.request(name, "HEAD", self.client().head_object, Bucket=self.bucket, Key=self.key(name))
            return True
        except FileNotFoundError:
            return False

    def key(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}" if self.prefix else name

    def list(self) -> list[str]:
        """The folder's entries (objects and sub-prefixes), every page of the listing."""
        prefix, names, token = self.key(""), [], None
        while True:
            page = self.request(
                None,
                "list",
                self.client().list_objects_v2,
                Bucket=self.bucket,
                Prefix=prefix,
                Delimiter="/",
                **({"ContinuationToken": token} if token else {}),
            )
            names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
            names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(n for n in names if n)

    def is_folder(self) -> bool:
        return bool(self.list())

    def names(self) -> builtins.list[str]:
        return self.list()

    def read(self, name: str) -> bytes:
        try:
            return bytes(self._get(name, "GET", None, None, Key=self.key(name)))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.where(name)}: missing from the checkpoint") from None

    def _get(self, name: str, what: str, dst: memoryview | None, etag: str | None, **kwargs) -> bytes | bytearray:
        """One GET whose body is read whole (into ``dst`` when given) before the request's
        deadline; a body cut short (a dropped connection) is asked again with backoff, like
        the requests botocore retries. Returns the body (``b""`` when read into ``dst``)."""
        import http.client

        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from urllib3.exceptions import HTTPError as Urllib3Error

        transient: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, Urllib3Error)
        transient += (ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError)
        attempts = self.options["config_kwargs"]["retries"].get("max_attempts", S3_ATTEMPTS)
        where = self.where(name) if name is not None else self.url
        failure: BaseException | None = None
        for attempt in range(max(1, attempts)):
            deadline = time.monotonic() + self.request_deadline
            response = self.request(name, what, self.client().get_object, etag, Bucket=self.bucket, **kwargs)
            if dst is not None and response["ContentLength"] != len(dst):
                response["Body"].close()
                raise CheckpointFormatError(f"{where}: short read at {what}; truncated?")
            try:
                return read_body(response, dst, deadline)
            except BodyCutShort as e:
                if e.timed_out:
                    raise StorageError(
                        f"{where}: {what}: the answer did not arrive whole within {self.request_deadline:g} s "
                        f"({e}); set storage_options['request_deadline'] for slower links"
                    ) from None
                failure = e
            except transient as e:
                failure = e
            if attempt == attempts - 1:
                raise StorageError(f"{where}: {what}: the answer was cut short {attempts} times ({failure})")
            time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def client(self):
        """The process's botocore client for this endpoint and these credentials: building one
        costs ~0.1 s, and botocore clients are thread-safe, so stores share it."""
        if self._client is None:
            opts = self.storage_options
            client_kwargs = dict(opts.get("client_kwargs") or {})
            endpoint = (
                client_kwargs.pop("endpoint_url", None)
                or opts.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
            )
            ident = (endpoint, opts.get("key"), opts.get("secret"), opts.get("token"), client_kwargs.get("region_name"))
            timeouts = self.options["config_kwargs"]
            ident += (timeouts["connect_timeout"], timeouts["read_timeout"], repr(timeouts["retries"]))
            with _CLIENTS_LOCK:
                if ident not in _CLIENTS:
                    import botocore.config
                    import botocore.session

                    config = botocore.config.Config(
                        max_pool_connections=64,
                        connect_timeout=timeouts["connect_timeout"],
                        read_timeout=timeouts["read_timeout"],
                        retries=timeouts["retries"],
                    )
                    _CLIENTS[ident] = botocore.session.get_session().create_client(
                        "s3",
                        endpoint_url=endpoint,
                        aws_access_key_id=ident[1],
                        aws_secret_access_key=ident[2],
                        aws_session_token=ident[3],
                        config=config,
                        **({"region_name": ident[4]} if ident[4] else {}),
                    )
                self._client = _CLIENTS[ident]
        return self._client

    def open(self, name: str) -> tuple:
        """The object's size and ETag, from one HEAD; every later read of it is a ranged GET
        with ``If-Match`` on that ETag, so all bytes come from the same object version."""
        path = self.path_of(name)
        bucket, _, key = path.partition("/")
        try:
            head = self.request(name, "HEAD", self.client().head_object, Bucket=bucket, Key=key)
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.where(name)}: missing from the checkpoint") from None
        return path, head["ContentLength"], head["ETag"]

    def read_range(self, handle, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        end = min(offset + length, handle[1])
        return b"".join(self._fetch(handle, handle[0].rsplit("/", 1)[-1], [(offset, end)])) if end > offset else b""

    def request(self, name: str | None, what: str, fn, etag: str | None = None, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.where(name) if name is not None else self.url
        try:  # botocore already retries throttling, dropped connections and timeouts
            return fn(**kwargs, **({"IfMatch": etag} if etag else {}))
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(where) from e
            if code == "NoSuchBucket":
                raise StorageError(
                    f"{where}: the bucket {self.bucket!r} does not exist (create it first, or check the endpoint)"
                ) from None
            if code in ("PreconditionFailed", "412"):
                raise MixedCheckpointError(
                    f"{where}: replaced while being read (its ETag is no longer {etag}): "
                    f"the checkpoint was overwritten during the load; load again"
                ) from None
            raise StorageError(f"{where}: {what}: {e}") from e
        except BotoCoreError as e:
            if _is_timeout(e):  # botocore already waited and retried
                raise StorageError(f"{where}: {what}: no answer from the server ({e})") from e
            raise StorageError(f"{where}: {what}: {e}") from e

    def _fetch(self, handle, name: str, ranges: builtins.list[tuple[int, int]]) -> builtins.list[bytes | bytearray]:
        key = handle[0].partition("/")[2]
        return [
            self._get(name, f"bytes {a}-{b}", None, handle[2], Key=key, Range=f"bytes={a}-{b - 1}") for a, b in ranges
        ]

    def _fetch_into(self, handle, name: str, a: int, b: int, dst: memoryview) -> None:
        """One ranged GET read straight into ``dst`` (see :func:`read_body`)."""
        key = handle[0].partition("/")[2]
        self._get(name, f"bytes {a}-{b}", dst, handle[2], Key=key, Range=f"bytes={a}-{b - 1}")


class BodyCutShort(Exception):
    """A response body ended before its Content-Length (``timed_out``: cut at the deadline)."""

    def __init__(self, message: str, timed_out: bool):
        super().__init__(message)
        self.timed_out = timed_out


def read_body(response: dict, dst: memoryview | None, deadline: float) -> bytes | bytearray:
    """A GET response's whole body, into ``dst`` (then ``b""``) or as bytes: from the socket
    through http.client's ``readinto`` (urllib3's own ``readinto`` reads into a new bytes
    object and copies). At ``deadline`` a timer shuts the connection's socket, so a body
    trickling in never runs longer. A body that ends before its ``Content-Length`` is
    :class:`BodyCutShort`."""
    length = response["ContentLength"]
    buffer = bytearray(length) if dst is None else None
    out = dst if dst is not None else memoryview(buffer or bytearray())
    stream = response["Body"]._raw_stream  # urllib3's response; S3 objects carry no content encoding
    fp = getattr(stream, "_fp", None) or stream
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = getattr(getattr(stream, "_connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    got = 0
    try:
        while got < length:
            n = fp.readinto(out[got:])
            if not n:
                break
            got += n
    except OSError:
        if not expired.is_set():
            raise
    finally:
        timer.cancel()
        if got == length and not expired.is_set():
            stream.release_conn()
        else:
            stream.close()  # never back to the pool: the connection is broken or still sending
    if got != length or expired.is_set():
        raise BodyCutShort(f"{got} of {length} bytes arrived", expired.is_set())
    return b"" if buffer is None else buffer
