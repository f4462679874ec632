"""HFStorageReader: DCP loads any Hugging Face safetensors checkpoint into any sharding.

Metadata comes from the index json; a file's header is read (and validated) only when a key
in it is first needed, once per process. Reads go straight into the destination tensors.

A load never mixes two saves: each file is opened once (header and data from the same
descriptor, or on S3 the same ETag), every file must carry the save id the index records, and
all ranks check they read the coordinator's save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_hf import training_state
from dcp_hf.boxes import RunGrid, box_runs
from dcp_hf.contract import HFMetadata
from dcp_hf.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    DcpHfError,
    MixedCheckpointError,
    StateDictMismatchError,
    on_every_rank,
)
from dcp_hf.format import (
    INDEX_NAME,
    SAVE_ID_KEY,
    SINGLE_FILE_NAME,
    FileHeader,
    TensorEntry,
    read_header,
)
from dcp_hf.format.dtypes import itemsize
from dcp_hf.format.index import decode_index_record
from dcp_hf.progress import Progress, log_throughput
from dcp_hf.storage.exchange import SharedMemory, exchange_bytes, open_shared
from dcp_hf.storage.shared_reads import Band, BandPlan, Need, plan_bands, read_bands, segment_sizes
from dcp_hf.storage.staging import SLOT_BYTES, Slab, Stager, pump
from dcp_hf.storage.stores import open_store
from dcp_hf.storage.verified import VerifiedStore

logger = logging.getLogger("dcp_hf")

# A box read in runs shorter than this, on a load of several ranks, is read in bands: each
# byte once by one rank in long reads, then sent to the ranks that need it (shared_reads).
SHORT_RUN = 256 << 10


@dataclass(frozen=True)
class _SaveCheck:
    """The coordinator's save id and the number of ranks loading, sent to every rank with its
    load plan."""

    save_id: str | None
    ranks: int = 1


class _Work(NamedTuple):
    """A checked read item and its destination."""

    item: ReadItem
    entry: TensorEntry
    dest: torch.Tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.item.lengths) * itemsize(self.entry.dtype)

    def grid(self) -> RunGrid:
        return box_runs(
            self.entry.shape, tuple(self.item.storage_offsets), tuple(self.item.lengths), itemsize(self.entry.dtype)
        )


class _LazyTensorMetadata(Mapping):
    """key -> TensorStorageMetadata, reading a file's header the first time one of its keys is
    looked up. Iterating the keys reads nothing."""

    def __init__(self, reader: "HFStorageReader"):
        self._reader = reader

    def __getitem__(self, key: str) -> TensorStorageMetadata | BytesStorageMetadata:
        if key.startswith(training_state.BYTES) and key in self._reader.weight_map:
            return BytesStorageMetadata()
        e = self._reader.entry(key)
        return TensorStorageMetadata(
            properties=TensorProperties(dtype=e.dtype),
            size=torch.Size(e.shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(e.shape)), sizes=torch.Size(e.shape))],
        )

    def __contains__(self, key: object) -> bool:
        return key in self._reader.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.weight_map)

    def __len__(self) -> int:
        return len(self._reader.weight_map)


class _FailedMetadata(Mapping):
    """The metadata of a checkpoint that could not be read: any use raises the reason."""

    def __init__(self, error: Exception):
        self._error = error

    def __getitem__(self, key):
        raise self._error

    def __iter__(self):
        raise self._error

    def __len__(self):
        raise self._error


@dataclass(frozen=True)
class InEffect:
    """What readers load from a folder, in transformers' order: ``model.safetensors`` alone
    (``indexes`` empty) when there is no model index or the index does not name it, else the
    model index and the training-state index it names: ``[(name, IndexRecord), ...]``."""

    indexes: list


def in_effect(store) -> InEffect | None:
    """The checkpoint files readers of ``store`` follow (None: neither a model index nor
    ``model.safetensors``). A save commits by changing exactly this (see :mod:`.commit`)."""
    if not store.exists(INDEX_NAME):
        return InEffect([]) if store.exists(SINGLE_FILE_NAME) else None
    model = decode_index_record(store.read(INDEX_NAME), store.where(INDEX_NAME))
    if SINGLE_FILE_NAME not in model.weight_map.values() and store.exists(SINGLE_FILE_NAME):
        return InEffect([])  # a save to shards put its index; removing model.safetensors commits it
    indexes = [(INDEX_NAME, model)]
    state_name = model.training_state_index
    if state_name is None and store.exists(training_state.INDEX_NAME):  # an index that names none
        state = decode_index_record(store.read(training_state.INDEX_NAME), store.where(training_state.INDEX_NAME))
        if model.save_id is None or state.save_id == model.save_id:  # not a replaced save's leftover
            indexes.append((training_state.INDEX_NAME, state))
    elif state_name is not None:
        if not store.exists(state_name):
            raise CheckpointFormatError(f"{store.where(state_name)}: named by {INDEX_NAME} but missing")
        indexes.append((state_name, decode_index_record(store.read(state_name), store.where(state_name))))
    return InEffect(indexes)


class HFStorageReader(StorageReader):
    """Read a Hugging Face safetensors checkpoint with ``torch.distributed.checkpoint.load``.

    Args:
        path: checkpoint folder or fsspec URL (``s3://...``): ``model.safetensors.index.json``
            + shards, or one ``model.safetensors``, or ``*.safetensors`` files without an index.
        allow_dtype_cast: cast into destination tensors of another dtype; by default a dtype
            mismatch is an error.
        storage_options: fsspec options for URLs (endpoint, credentials); without them the
            provider's standard chain is used (for S3: ``AWS_ENDPOINT_URL``, env, profile).
        thread_count: reader threads per rank (default 4 local, 16 remote: each remote thread
            keeps one ranged GET of ``io_chunk_bytes`` in flight).
        progress: show a progress bar with bytes and GB/s on the coordinator (all ranks' bytes,
            estimated as the coordinator's times the number of ranks).
        process_group: the group ``dcp.load`` runs on (default: the default group). Boxes that
            lie in short runs (column shards, 2-D meshes) are read in bands of ``band_bytes``,
            each by one rank, and sent to the ranks that need them, in rounds of at most about
            ``round_bytes`` per rank; ``band_bytes=0`` makes every rank read its own boxes.
        verify: check every byte read against the block digests the save recorded in the
            index (CRC-32C per 4 MiB): reads then go by whole blocks, each checked before its
            bytes are used, and a changed byte is a ``ChecksumMismatchError`` naming the file,
            byte range and keys, on every rank. Checkpoints without recorded digests (other
            tools', older ones, a single-file save) load unverified, with a warning.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        allow_dtype_cast: bool = False,
        storage_options: dict | None = None,
        thread_count: int | None = None,
        io_chunk_bytes: int | None = None,
        progress: bool = False,
        process_group=None,
        band_bytes: int = 16 << 20,
        round_bytes: int = 64 << 20,
        verify: bool = False,
    ):
        super().__init__()
        self.verify = verify
        self.progress = progress
        self.path = os.fspath(path)
        self.storage_options = storage_options
        self.store = open_store(self.path, storage_options)
        self.allow_dtype_cast = allow_dtype_cast
        # Remote stores want many smaller requests in flight; local reads are copies.
        self.thread_count = thread_count or (16 if self.store.remote else 4)
        self.io_chunk_bytes = io_chunk_bytes or ((8 << 20) if self.store.remote else (32 << 20))
        self.process_group = process_group
        self.band_bytes, self.round_bytes = band_bytes, round_bytes
        self.is_coordinator, self.world_size = False, 1  # set by set_up_storage_reader
        self.weight_map: dict[str, str] = {}
        self.headers: dict[str, FileHeader] = {}
        self.save_id: str | None = None  # of the index (or the files, without one)
        self.digests: dict = {}  # file -> FileDigest, as the index records them
        self.bytes_read = 0
        self.bytes_from_other_hosts = 0  # bytes of bands received over the process group
        self._lock = threading.Lock()
        self._handles: dict[str, object] = {}  # file -> open handle, from its header read on
        self._reads = 0  # read_data calls in progress (streaming conversions run several at once)
        self._pool: ThreadPoolExecutor | None = None  # the reader threads of a ``session``

    # -- DCP protocol -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.close()
        if isinstance(self.store, VerifiedStore):  # verified with the next index's digests
            self.store = self.store.inner
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
            self.store = open_store(self.path, self.storage_options)
        self.weight_map, self.headers, self.bytes_read, self.save_id, self.digests = {}, {}, 0, None, {}
        self._first_try_error = None
        self.bytes_from_other_hosts = 0

    @contextlib.contextmanager
    def session(self):
        """For many ``read_data`` calls in a row (a streaming conversion makes one per band):
        meanwhile the files stay open and the reads share one pool of reader threads, instead
        of each opening the files and starting its own threads."""
        pool = ThreadPoolExecutor(self.thread_count, thread_name_prefix="dcp-hf-read")
        with self._lock:
            if self._pool is not None:
                pool.shutdown()
                raise RuntimeError(f"{self.path}: a read session is already open")
            self._reads += 1  # keeps the files open until the session ends
            self._pool = pool
        try:
            yield self
        finally:
            with self._lock:
                self._pool = None
            pool.shutdown()
            self.close(finished_read=True)

    @contextlib.contextmanager
    def _threads(self):
        """The session's reader threads, or a pool of this read's own."""
        if self._pool is not None:
            yield self._pool
            return
        with ThreadPoolExecutor(self.thread_count, thread_name_prefix="dcp-hf-read") as pool:
            yield pool

    def close(self, finished_read: bool = False) -> None:
        """Close the files held open since their headers were read (``read_data`` does, when
        no other read of this reader still uses them: streaming conversions run several)."""
        with self._lock:
            if finished_read:
                self._reads -= 1
                if self._reads:
                    return
            handles, self._handles = self._handles, {}
        for handle in handles.values():
            self.store.close(handle)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        store = open_store(checkpoint_id)
        return store.exists(INDEX_NAME) or store.exists(SINGLE_FILE_NAME)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if not self.weight_map:
            try:
                if kwargs.get("rank") is not None and self._first_try_error is not None:
                    raise self._first_try_error  # asked again after it failed: not twice the requests
                self.weight_map = self._read_weight_map()
            except DcpHfError as e:
                if kwargs.get("rank") is None:
                    self._first_try_error = e
                    raise
                # DCP's second try, after the first raised: DCP would replace the error with
                # "AssertionError: metadata is None". Metadata that raises it where it is used
                # (set_up_storage_reader) lets DCP report it as it is, on every rank.
                self._metadata_error = e
                failed = _FailedMetadata(e)
                return HFMetadata(state_dict_metadata=failed, checkpoint=self.path)  # type: ignore[arg-type]
        return HFMetadata(
            state_dict_metadata=_LazyTensorMetadata(self),  # type: ignore[arg-type]  # DCP only reads it
            storage_meta=StorageMeta(checkpoint_id=self.path),
            checkpoint=self.path,
            allow_dtype_cast=self.allow_dtype_cast,
            read_headers=self.read_headers_of,
        )

    def read_headers_of(self, keys: Iterable[str]) -> None:
        """Read the headers of the files holding ``keys``, concurrently."""
        self.load_headers({self.weight_map[k] for k in keys if k in self.weight_map})

    _metadata_error: DcpHfError | None = None
    _first_try_error: DcpHfError | None = None  # of DCP's first read_metadata call

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self.world_size = _world_size()
        if self._metadata_error is not None:
            error, self._metadata_error = self._metadata_error, None
            raise error

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        check = _SaveCheck(self.save_id, len(plans))
        return [dataclasses.replace(p, storage_data=check) for p in plans]

    def _check_same_save(self, plan: LoadPlan) -> None:
        check = plan.storage_data
        if isinstance(check, _SaveCheck) and check.save_id != self.save_id:
            raise MixedCheckpointError(
                f"{self.store.where(INDEX_NAME)}: this rank read save {self.save_id}, the "
                f"coordinator save {check.save_id}: the checkpoint was overwritten during the "
                f"load; load again"
            )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        start = time.perf_counter()
        with self._lock:
            self._reads += 1
        try:
            plan = self._load_objects(plan, planner)
            group = self._exchange_group(plan)
            if group is None:
                needed = self._read_plan(self._checked_work(plan, planner), planner)
            else:
                needed = self._read_plan_shared(plan, planner, group)
        finally:
            self.close(finished_read=True)
        log_throughput("loaded", needed, time.perf_counter() - start, self.path)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _load_objects(self, plan: LoadPlan, planner: LoadPlanner) -> LoadPlan:
        """Load the plan's values that are not tensors (training state: ``torch.save`` bytes
        stored as a uint8 tensor); the plan of its tensors is left."""
        objects = [i for i in plan.items if i.type == LoadItemType.BYTE_IO]
        if not objects:
            return plan
        self._check_same_save(plan)
        for item in objects:
            key = item.storage_index.fqn
            if not key.startswith(training_state.BYTES):
                raise StateDictMismatchError(f"{item.dest_index.fqn!r}: an HF checkpoint holds tensors only")
            entry = self.entry(key)
            data = self.store.read_range(self._handle(self.weight_map[key]), entry.start, entry.nbytes)
            if len(data) != entry.nbytes:
                raise CheckpointFormatError(f"{self.store.where(self.weight_map[key])}: {key!r} is cut short")
            planner.load_bytes(item, io.BytesIO(data))
        return dataclasses.replace(plan, items=[i for i in plan.items if i.type != LoadItemType.BYTE_IO])

    def _exchange_group(self, plan: LoadPlan):
        """The process group of a load of several ranks whose boxes may be read in bands, or
        None. Only plans from ``prepare_global_plan`` (every rank of the group calls
        ``read_data`` then) on a group of as many ranks as plans qualify."""
        import torch.distributed as dist

        check = plan.storage_data
        if not (isinstance(check, _SaveCheck) and check.ranks > 1 and self.band_bytes > 0 and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) == check.ranks else None

    def _checked_work(self, plan: LoadPlan, planner: LoadPlanner) -> list[_Work]:
        """Every item checked before anything is read, so a bad request modifies no destination."""
        self._check_same_save(plan)
        work = []
        for item in sorted(plan.items, key=lambda i: (self._file_of(i), self.entry(i.storage_index.fqn).start)):
            if item.type == LoadItemType.BYTE_IO:
                raise StateDictMismatchError(f"{item.dest_index.fqn!r}: an HF checkpoint holds tensors only")
            entry = self.entry(item.storage_index.fqn)
            dest = planner.resolve_tensor(item).detach()
            self._check_destination(item, entry, dest)
            work.append(_Work(item, entry, dest))
        return work

    def _progress(self, work: list[_Work]) -> Progress:
        own = sum(w.nbytes for w in work)
        return Progress(self.progress and self.is_coordinator, own * self.world_size, "dcp-hf load", own=own)

    def _read_plan(self, work: list[_Work], planner: LoadPlanner) -> int:
        progress = self._progress(work)
        with self._threads() as pool:
            self._read_direct(work, pool, progress)
        progress.close()
        for w in work:
            planner.commit_tensor(w.item, w.dest)
        return sum(w.nbytes for w in work)

    def _read_direct(self, work: list[_Work], pool: ThreadPoolExecutor, progress: Progress) -> None:
        """Each box read by this rank straight from storage into its destination, in pieces of
        at most ``io_chunk_bytes``; destinations that are not contiguous CPU tensors of the
        stored dtype (CUDA tensors, casts) go through a ring of (pinned) host buffers, copied
        on while the next pieces are read. One stager per call: streaming conversions run
        several reads of one reader at once."""

        def read(piece) -> int:
            w: _Work = piece.tag
            file = self.weight_map[w.entry.name]
            box = tuple(o + p for o, p in zip(w.item.storage_offsets, piece.offsets))
            grid = box_runs(w.entry.shape, box, piece.sizes, itemsize(w.entry.dtype))
            return self.store.read_grid(self._handle(file), file, w.entry.start, grid, piece.data)

        stager = Stager(slots=self.thread_count + 2, slot_bytes=min(self.io_chunk_bytes, SLOT_BYTES))
        for nread in pump(stager.load(Slab(w.dest, w.entry.dtype, w) for w in work), read, pool):
            self.bytes_read += nread
            progress.update(nread)

    def _read_plan_shared(self, plan: LoadPlan, planner: LoadPlanner, group) -> int:
        """A load of several ranks: boxes in short runs are read in bands (each byte once, by
        one rank, then sent; see shared_reads), the others directly. Every rank takes part in
        every collective; a failure on any rank makes every rank raise, after the rounds."""
        import torch.distributed as dist

        work = on_every_rank(lambda: self._checked_work(plan, planner), group)
        me, world = dist.get_rank(group), dist.get_world_size(group)
        short = [w for w in work if _short(w.grid())]
        needs = [
            Need(
                w.entry.name,
                self.weight_map[w.entry.name],
                w.entry.start,
                tuple(w.entry.shape),
                w.entry.dtype,
                tuple(w.item.storage_offsets),
                tuple(w.item.lengths),
            )
            for w in short
        ]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, needs, group=group)
        bands = plan_bands(gathered, self.band_bytes, self.round_bytes)
        shared = bands.shared[me]
        direct = [w for w in work if not _short(w.grid())] + [w for i, w in enumerate(short) if i not in shared]
        progress = self._progress(work)
        memory = _shared_memory(bands, gathered, me, group)

        def read() -> None:
            with self._threads() as pool:
                failure = None
                try:
                    self._read_direct(direct, pool, progress)
                except Exception as e:  # noqa: BLE001 - raised after the rounds
                    failure = e
                try:
                    moved = read_bands(
                        bands,
                        gathered,
                        me,
                        {i: short[i].dest for i in shared},
                        self._read_band,
                        lambda tasks: _run_all(pool, tasks),
                        lambda send, out, into, recv: exchange_bytes(send, out, into, recv, group),
                        lambda: dist.barrier(group=group),
                        memory,
                    )
                    self.bytes_read += moved.read
                    self.bytes_from_other_hosts += moved.from_other_hosts
                except Exception as e:  # noqa: BLE001
                    failure = failure or e
                if failure is not None:
                    raise failure
            progress.update(sum(short[i].nbytes for i in shared))

        try:
            on_every_rank(read, group)
        finally:
            if memory is not None:
                memory.close()
        progress.close()
        for w in work:
            planner.commit_tensor(w.item, w.dest)
        return sum(w.nbytes for w in work)

    def _read_band(self, band: Band, out: memoryview) -> int:
        """A band's rows: one long read (one ranged GET on object stores)."""
        file = band.need.file
        return self.store.read_grid(self._handle(file), file, band.offset, RunGrid(0, band.nbytes), out)

    # -- metadata -----------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        found = in_effect(self.store)
        if found is not None and found.indexes:
            (_, model), *state = found.indexes
            weight_map, self.save_id, digests = model.weight_map, model.save_id, dict(model.digests)
            for name, index in state:  # a training checkpoint's other half
                where = self.store.where(name)
                digests.update(index.digests)
                if index.save_id != self.save_id:
                    raise MixedCheckpointError(
                        f"{where}: of save {index.save_id}, but {INDEX_NAME} is of save {self.save_id}: the "
                        f"checkpoint was overwritten while being read, or a save into it was interrupted"
                    )
                outside = [k for k in index.weight_map if not training_state.is_training_state(k)]
                if outside:
                    raise CheckpointFormatError(f"{where}: key {outside[0]!r} is not under {training_state.PREFIX!r}")
                weight_map = {**weight_map, **index.weight_map}
            self._verify_with(digests)
            return weight_map
        if not self.store.is_folder():
            raise CheckpointNotFoundError(f"{self.path}: no such checkpoint folder{self.store.missing_hint()}")
        if found is not None:  # model.safetensors, which transformers loads before any index
            files = [SINGLE_FILE_NAME]
        else:
            files = [n for n in self.store.list() if n.endswith(".safetensors") and not n.startswith(".")]
        if not files:
            raise CheckpointNotFoundError(
                f"{self.path}: no {INDEX_NAME} and no .safetensors file; not an HF checkpoint"
            )
        self.load_headers(files)
        ids = {f: (self.headers[f].metadata or {}).get(SAVE_ID_KEY) for f in sorted(files)}
        if len(set(ids.values())) > 1:
            raise MixedCheckpointError(
                f"{self.path}: files of different saves: "
                + ", ".join(f"{f} (save {i})" for f, i in ids.items())
                + "; the checkpoint was overwritten while being read, or a save into it was interrupted"
            )
        self.save_id = next(iter(ids.values()))
        self._verify_with({})
        weight_map = {}
        for file in files:
            for key in self.headers[file].tensors:
                if key in weight_map:
                    raise CheckpointFormatError(f"{self.path}: key {key!r} is in both {weight_map[key]} and {file}")
                weight_map[key] = file
        return weight_map

    def _verify_with(self, digests: dict) -> None:
        """With ``verify``, read through a store that checks every block against ``digests``."""
        self.digests = digests
        if not self.verify:
            return
        if not digests:
            logger.warning(
                "%s: no digests recorded (another tool's or an older checkpoint): loading unverified", self.path
            )
            return
        self.store = VerifiedStore(
            self.store, digests, lambda file: self.headers.get(file), cached_blocks=2 * self.thread_count
        )

    def load_headers(self, files: Iterable[str]) -> None:
        missing = [f for f in set(files) if f not in self.headers]
        if len(missing) > 1:
            with ThreadPoolExecutor(min(len(missing), 16)) as pool:
                list(pool.map(self._load_header, missing))
        elif missing:
            self._load_header(missing[0])

    def _load_header(self, file: str) -> FileHeader:
        with self._lock:
            if file in self.headers:
                return self.headers[file]
        header, handle = self._open(file)
        with self._lock:
            if file in self.headers:  # read concurrently by another thread: keep one
                self.store.close(handle)
            else:
                self.headers[file], self._handles[file] = header, handle
            return self.headers[file]

    def _open(self, file: str) -> tuple[FileHeader, object]:
        """Open a file and read its header, checked against the index; the data is read later
        through the same handle (so it cannot come from another file put at the name)."""
        path = self.store.where(file)
        try:
            handle = self.store.open(file)
        except CheckpointFormatError as e:
            if "missing from the checkpoint" not in str(e):
                raise
            raise CheckpointFormatError(f"{path}: named by {INDEX_NAME} but missing from the checkpoint") from None
        try:
            header = read_header(lambda off, n: self.store.read_range(handle, off, n), path, self.store.size(handle))
            if self.weight_map:
                self._check_save_id(header, path)
                self._check_index_agrees(header, file, path)
        except BaseException:
            self.store.close(handle)
            raise
        return header, handle

    def _handle(self, file: str):
        """The open handle of a file whose header was read (reopened, and the header checked
        unchanged, after an earlier ``read_data`` closed it)."""
        with self._lock:
            handle = self._handles.get(file)
        if handle is not None:
            return handle
        header, handle = self._open(file)
        with self._lock:
            if header != self.headers[file]:
                self.store.close(handle)
                raise MixedCheckpointError(
                    f"{self.store.where(file)}: changed since its header was "
                    f"read (the checkpoint was overwritten); load again"
                )
            if file in self._handles:
                self.store.close(handle)
            else:
                self._handles[file] = handle
            return self._handles[file]

    def _check_index_agrees(self, header: FileHeader, file: str, path: str) -> None:
        """The index must agree with the header, both ways."""
        for key in header.tensors:
            if self.weight_map.get(key) != file:
                raise CheckpointFormatError(
                    f"{path}: holds {key!r}, but {INDEX_NAME} maps it to {self.weight_map.get(key)!r}"
                )
        for key, f in self.weight_map.items():
            if f == file and key not in header.tensors:
                raise CheckpointFormatError(f"{path}: {INDEX_NAME} maps {key!r} to this file, but its header lacks it")

    def _check_save_id(self, header: FileHeader, path: str) -> None:
        got = (header.metadata or {}).get(SAVE_ID_KEY)
        if got != self.save_id:
            raise MixedCheckpointError(
                f"{path}: written by save {got}, but {INDEX_NAME} is of save {self.save_id}: the "
                f"checkpoint was overwritten while being read, or a save into it was interrupted "
                f"(files of two saves); load again, or save the checkpoint again"
            )

    def entry(self, key: str) -> TensorEntry:
        try:
            file = self.weight_map[key]
        except KeyError:
            raise StateDictMismatchError(f"{self.path}: the checkpoint has no tensor {key!r}") from None
        header = self.headers.get(file) or self._load_header(file)
        return header.tensors[key]

    def _file_of(self, item: ReadItem) -> str:
        return self.weight_map.get(item.storage_index.fqn, "")

    # -- data ---------------------------------------------------------------------------------
    def _check_destination(self, item: ReadItem, entry: TensorEntry, dest: torch.Tensor) -> None:
        where = f"{self.store.where(self.weight_map[entry.name])}: {entry.name!r}"
        if tuple(dest.shape) != tuple(item.lengths):
            raise StateDictMismatchError(
                f"{where}: destination of shape {list(dest.shape)} for a read of {list(item.lengths)}"
            )
        if dest.dtype != entry.dtype and not self.allow_dtype_cast:
            raise StateDictMismatchError(
                f"{where}: checkpoint dtype {entry.dtype} but destination dtype {dest.dtype} "
                f"(pass allow_dtype_cast=True to HFStorageReader to cast)"
            )
        if any(o + n > d for o, n, d in zip(item.storage_offsets, item.lengths, entry.shape)) or (
            len(item.storage_offsets) != len(entry.shape)
        ):
            raise StateDictMismatchError(
                f"{where}: read at {list(item.storage_offsets)} of {list(item.lengths)} is outside "
                f"the stored shape {list(entry.shape)}"
            )


def _shared_memory(plan: BandPlan, needs: list[list[Need]], me: int, group) -> SharedMemory | None:
    """Shared memory segments for the rounds, the other ranks' of this host attached, when
    some ranks share a host, else None (the bands go over the process group). Collective when
    there are rounds (every rank knows it from the plan)."""
    if not plan.rounds:
        return None
    return open_shared(segment_sizes(plan, needs)[me], group, me, len(needs), "dcp-hf-load")


def _short(grid: RunGrid) -> bool:
    return grid.num_runs > 1 and grid.run_len < SHORT_RUN


def _run_all(pool: ThreadPoolExecutor, tasks: list[Callable[[], int]]) -> list[int]:
    """Run the tasks on the pool; wait for all of them (even after one failed) so none still
    writes into buffers the caller goes on to send."""
    futures = [pool.submit(task) for task in tasks]
    wait(futures)
    return [f.result() for f in futures]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
