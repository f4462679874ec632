"""HFStorageWriter: DCP writes a standard HF safetensors checkpoint, each rank writing its own
bytes straight into their final place.

The coordinator decides the whole checkpoint in ``prepare_global_plan``: which tensor goes in
which file (huggingface_hub's grouping under ``max_shard_size``), every header and every byte
offset. On a file system each rank then ``pwrite``s its chunks' byte runs into the files
(hidden ``.partial`` names, in a hidden staging folder beside the destination), fsyncs them,
and the coordinator commits in ``finish``: renames, the index json, then one atomic exchange of
the whole folder (see :mod:`.commit`). On S3 each file is a multipart upload (see
:mod:`.multipart`). Every file and the index carry the save's id, so readers refuse a mix.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_hf.boxes import box_runs, byte_view
from dcp_hf.errors import CheckpointExistsError, StateDictMismatchError, StorageError, not_a_tensor
from dcp_hf.format import INDEX_NAME, FileLayout, TensorSpec, encode_index, parse_size
from dcp_hf.storage import commit
from dcp_hf.format.dtypes import itemsize, name_from_dtype
from dcp_hf.planners.save import COMPACT_PLANS
from dcp_hf.planners.summary import LocalSummary, MergedPlan, RankAssignment, decode_table, encode_table, summarize
from dcp_hf.progress import Progress, log_throughput
from dcp_hf.storage.hf_files import HFFiles
from dcp_hf.storage.exchange import Part, assemble, clip_runs, exchange, part_of, plan_parts
from dcp_hf.storage.multipart import Uploader, make_target
from dcp_hf.storage.posix import fsync_dir, pwrite_all, write_runs
from dcp_hf.storage.stores import open_store

logger = logging.getLogger("dcp_hf")

DtypePolicy = torch.dtype | Callable[[str, torch.dtype], torch.dtype] | None
_PARTIAL = re.compile(r"^\.(.+)\.([0-9a-f]{12})\.partial$")
_SHARD_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


@dataclass
class _RankPlan:
    """What one rank needs to write its part (travels in ``SavePlan.storage_data``). Every
    rank lays out the files itself from the table, exactly as the coordinator did, so the
    message stays small however many tensors and ranks there are."""

    save_id: str
    table: dict  # every tensor of the checkpoint (export dtypes), see summary.encode_table
    headers: set[int]  # files whose header this rank writes
    uploads: dict[int, str] | None = None  # object stores: file number -> multipart upload id
    parts: list[Part] | None = None  # object stores: every part of every file, with its owner
    work: str = ""  # file systems: the folder the files are built in
    created: dict[int, commit.FileId] | None = None  # file systems: each file, as created


_RESULT = "__dcp_hf_rank__"  # each rank's one WriteResult: its bytes (and uploaded parts)


def resolve_chunk(planner: SavePlanner, item) -> torch.Tensor:
    """The item's data from the planner, checked: a real tensor of the chunk's shape."""
    tensor, key = planner.resolve_data(item), item.index.fqn
    if not isinstance(tensor, torch.Tensor):
        raise StateDictMismatchError(f"{key!r}: the planner returned no tensor")
    if tensor.device.type == "meta":
        raise StateDictMismatchError(f"{key!r} is a meta tensor: it has no data to save")
    sizes = tuple(item.tensor_data.chunk.sizes)
    if tuple(tensor.shape) != sizes:
        raise StateDictMismatchError(
            f"{key!r}: the planner returned shape {list(tensor.shape)} for a chunk of shape {list(sizes)}"
        )
    return tensor.detach()


class _ResolvedOnce:
    """An item's data, resolved by the planner on first use and dropped after ``uses`` uses."""

    def __init__(self, planner: SavePlanner, item, uses: int):
        self.planner, self.item, self.uses = planner, item, uses
        self.tensor: torch.Tensor | None = None
        self.lock = threading.Lock()

    def acquire(self) -> torch.Tensor:
        with self.lock:
            if self.tensor is None:
                self.tensor = resolve_chunk(self.planner, self.item)
            return self.tensor

    def release(self) -> None:
        with self.lock:
            self.uses -= 1
            if self.uses == 0:
                self.tensor = None


def partial_name(name: str, save_id: str) -> str:
    return f".{name}.{save_id}.partial"


class HFStorageWriter(StorageWriter):
    """Write a Hugging Face safetensors checkpoint with ``torch.distributed.checkpoint.save``.

    Args:
        path: output folder (created if missing).
        max_shard_size: largest file size, int bytes or e.g. "5GB" (10**9, as huggingface_hub).
        dtype: export dtype: a floating dtype that floating tensors of 16 bits or more are cast
            to (e.g. torch.bfloat16 for fp32 training state; the ``*_scale_inv`` block scales of
            quantized weights stay as they are), or ``f(key, dtype) -> dtype``.
        overwrite: replace a checkpoint already in ``path``; its files that the new index does
            not name are removed after the new one is committed.
        progress: show a progress bar with bytes and GB/s on the coordinator.
        thread_count: writer threads per rank (writes to one file share its inode lock, so a
            few threads suffice; more help only with many files or slow dtype conversions);
            on S3, concurrent part uploads per rank.
        storage_options: for ``s3://`` paths, s3fs options (endpoint, credentials); without
            them the standard AWS chain is used (``AWS_ENDPOINT_URL``, environment, profile).
        process_group: on S3, the group whose ranks exchange the bytes of shared parts: the
            group given to ``dcp.save`` (default: the default group).
        part_size: on S3, multipart part size (at least 5 MiB).
        round_bytes: on S3, the most bytes of parts a rank assembles at once.
        side_files: small files (e.g. ``{"config.json": b"..."}``) the coordinator writes
            beside the weights, before the index commits the checkpoint.
        config: the model's HF config (dict, transformers ``PretrainedConfig``, config.json or
            an HF folder), written as config.json so ``from_pretrained`` loads the output as
            is; when it ties the embeddings, ``lm_head.weight`` is left out (as
            ``save_pretrained`` does) after checking it equals the input embedding.
        copy_from: an HF folder whose other files (config.json unless ``config`` is given,
            generation config, tokenizer, processor, chat template) are copied beside the weights.
        file_map_from: an index json, or a checkpoint folder: keep its key -> file grouping
            (keys it does not name go in files after its own); e.g. the release a fine-tune
            started from.
        fqn_to_index_mapping: torch's ``HuggingFaceStorageWriter`` form of the same: key -> file
            number (1..N). ``save_distributed``, ``enable_consolidation`` and
            ``thread_count_consolidation`` of torch's writer are accepted and have nothing to
            do: every rank writes its bytes into the final files.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        dtype: DtypePolicy = None,
        overwrite: bool = False,
        progress: bool = False,
        thread_count: int | None = None,
        io_chunk_bytes: int = 64 << 20,
        storage_options: dict | None = None,
        process_group=None,
        part_size: int | str = "16MiB",
        round_bytes: int | str = "128MiB",
        side_files: dict[str, bytes] | None = None,
        config=None,
        copy_from: str | os.PathLike | None = None,
        file_map_from: str | os.PathLike | None = None,
        fqn_to_index_mapping: dict[str, int] | None = None,
        save_distributed: bool | None = None,
        enable_consolidation: bool | None = None,
        thread_count_consolidation: int | None = None,
    ):
        super().__init__()
        self.hf_files = HFFiles.from_options(config, copy_from, file_map_from, fqn_to_index_mapping)
        self.side_files = dict(side_files or {})
        for name in self.side_files:
            if name == INDEX_NAME or name.endswith(".safetensors") or "/" in name or name.startswith("."):
                raise ValueError(f"side file {name!r}: not a weights file, the index or a hidden name")
        self.path = os.fspath(path)
        self.storage_options = storage_options
        self.store = open_store(self.path, storage_options)
        self.target = make_target(self.store)
        self.process_group = process_group
        self.part_size = parse_size(part_size)
        self.round_bytes = parse_size(round_bytes)
        thread_count = thread_count or (8 if self.store.remote else 2)
        self.max_shard_size = parse_size(max_shard_size)
        self.dtype = dtype
        self.overwrite = overwrite
        self.progress = progress
        self.thread_count = thread_count
        self.io_chunk_bytes = io_chunk_bytes
        self.is_coordinator = False
        self._files: list[FileLayout] = []
        self._where: dict[str, tuple[int, int]] = {}  # key -> (file number, data offset)
        self._save_id = ""
        self._start = 0.0
        self._uploads: dict[int, str] = {}
        self._old: set[str] = set()
        self._dest: commit.Destination | None = None
        self._lock: str | None = None

    # -- DCP protocol -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
            self.store = open_store(self.path, self.storage_options)
            self.target = make_target(self.store)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        path = os.fspath(checkpoint_id)
        return "://" not in path or path.startswith(("s3://", "file://"))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, modules=[COMPACT_PLANS])

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self._start = time.perf_counter()

    def export_dtype(self, key: str, dtype: torch.dtype) -> torch.dtype:
        if self.dtype is None:
            return dtype
        if callable(self.dtype) and not isinstance(self.dtype, torch.dtype):
            return self.dtype(key, dtype)
        if key.endswith("_scale_inv"):  # the block scales of quantized weights stay float32
            return dtype
        if dtype.is_floating_point and itemsize(dtype) >= 2:
            return self.dtype
        return dtype

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        for item in plan.items:  # item plans of other planners; compact plans are checked globally
            key = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                raise not_a_tensor(key)
            name_from_dtype(self.export_dtype(key, item.tensor_data.properties.dtype), key=key)
        return plan

    @staticmethod
    def _merged(plans: list[SavePlan]) -> MergedPlan:
        """The merge of every rank's chunks: HFSavePlanner's, or made here from item plans."""
        data = plans[0].planner_data
        if isinstance(data, RankAssignment) and data.merged is not None:
            return data.merged
        if isinstance(data, LocalSummary):
            raise StateDictMismatchError("compact save plans reached the writer unmerged")
        return MergedPlan(
            [
                summarize(
                    (
                        i.index.fqn,
                        tuple(i.tensor_data.size),
                        i.tensor_data.properties.dtype,
                        tuple(i.tensor_data.chunk.offsets),
                        tuple(i.tensor_data.chunk.sizes),
                        i.index.fqn,
                    )
                    for i in p.items
                )[0]
                for p in plans
            ]
        )

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        merged = self._merged(plans)
        specs = []
        for key, (shape, dtype) in merged.table.items():
            export = self.export_dtype(key, dtype)
            name_from_dtype(export, key=key)
            specs.append(TensorSpec(key, export, shape))
        if not specs:
            raise StateDictMismatchError("the state dict holds no tensors: nothing to save")
        tied = self.hf_files.tied(s.key for s in specs)  # left out; each rank checks its boxes
        specs = [s for s in specs if s.key not in tied]
        self.side_files = {**self.hf_files.side_files(), **self.side_files}

        table = encode_table(specs)
        save_id = uuid.uuid4().hex[:12]
        files = self._lay_out(table, save_id)  # checks every name before anything is touched
        if self.target is not None:
            self._old = self._check_destination()
            return self._plan_uploads(plans, merged, files, table, save_id)
        self._lock = commit.acquire_lock(self.path, save_id)
        try:
            commit.clean_leftovers(self.path)
            self._old = self._check_destination()
            self._dest = commit.prepare(self.path, save_id)
            created = self._create_files(files, save_id)
        except BaseException:
            commit.release_lock(self._lock, save_id)
            raise
        # Each file's header is written by the rank that writes the file's first data bytes.
        header_owner = {
            n: merged.writer_of(key, (0,) * len(f.specs[key].shape))
            for n, f in enumerate(files)
            for key in list(f.offsets)[:1]
        }
        return [
            dataclasses.replace(
                plan,
                storage_data=_RankPlan(
                    save_id=save_id,
                    table=table,
                    headers={n for n, r in header_owner.items() if r == rank},
                    work=self._dest.work,
                    created=created,
                ),
            )
            for rank, plan in enumerate(plans)
        ]

    def _create_files(self, files: list[FileLayout], save_id: str) -> dict[int, commit.FileId]:
        """The coordinator creates every file (``O_EXCL|O_NOFOLLOW``); ranks open them checked."""
        created = {}
        for n, f in enumerate(files):
            path = os.path.join(self._dest.work, partial_name(f.name, save_id))
            try:
                fd, created[n] = commit.create_file(path)
            except OSError as e:
                raise StorageError(e.errno, f"creating {path}: {e.strerror}") from e
            os.close(fd)
        return created

    def _lay_out(self, table: dict, save_id: str) -> list[FileLayout]:
        """The files of the checkpoint (what goes where), the same on every rank."""
        if self._save_id != save_id:
            self._files = self.hf_files.lay_out(decode_table(table), self.max_shard_size, save_id)
            self._where = {key: (n, offset) for n, f in enumerate(self._files) for key, offset in f.offsets.items()}
            self._save_id = save_id
        return self._files

    def _plan_uploads(self, plans, merged: MergedPlan, files, table, save_id) -> list[SavePlan]:
        """Object stores: one multipart upload per file; parts owned by the rank holding most
        of their bytes."""
        spans = []
        for rank in range(len(plans)):
            mine = []
            for key, offsets, sizes in merged.written_by(rank):
                if key not in self._where:  # a tied weight, left out
                    continue
                n, offset = self._where[key]
                spec = files[n].specs[key]
                lo, hi = box_runs(spec.shape, offsets, sizes, itemsize(spec.dtype)).span()
                mine.append((n, offset + lo, offset + hi))
            spans.append(mine)
        parts = plan_parts(
            [f.size for f in files], spans, self.part_size, self.round_bytes, whole_files=self.target.sequential
        )
        self._uploads = {}
        try:
            for n, f in enumerate(files):
                self._uploads[n] = self.target.create(f.name)
        except BaseException:
            self._abort_uploads()
            raise
        first = {p.file: p.owner for p in parts if p.lo == 0}
        return [
            dataclasses.replace(
                plan,
                storage_data=_RankPlan(
                    save_id=save_id,
                    table=table,
                    uploads=dict(self._uploads),
                    headers={n for n, owner in first.items() if owner == rank},
                    parts=parts,
                ),
            )
            for rank, plan in enumerate(plans)
        ]

    def _abort_uploads(self) -> None:
        for n, upload_id in list(self._uploads.items()):
            try:
                self.target.abort(self._files[n].name, upload_id)
            except Exception:  # best effort: report the original failure
                logger.warning("could not abort the upload of %s", self._files[n].name, exc_info=True)
            del self._uploads[n]

    def _result(self, nbytes: int, uploaded=None) -> Future[list[WriteResult]]:
        """A rank's one write result (one per item would grow with ranks x tensors)."""
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([WriteResult(index=MetadataIndex(_RESULT), size_in_bytes=nbytes, storage_data=uploaded)])
        return fut

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rp: _RankPlan = plan.storage_data
        files = self._lay_out(rp.table, rp.save_id)
        plan = self.hf_files.drop_tied(plan, planner, self._where)
        if rp.parts is not None:
            return self._write_parts(plan, planner)
        fds: dict[int, int] = {}
        try:
            for n in sorted({self._where[item.index.fqn][0] for item in plan.items} | rp.headers):
                fds[n] = commit.open_created(
                    os.path.join(rp.work, partial_name(files[n].name, rp.save_id)), rp.created[n]
                )
            for n in rp.headers:
                pwrite_all(fds[n], memoryview(files[n].header), 0)
            tasks, total = [], 0
            for item in plan.items:
                n, offset = self._where[item.index.fqn]
                dtype = files[n].specs[item.index.fqn].dtype
                tasks += self._slab_tasks(item, planner, dtype, fds[n], offset, files[n].name)
                total += item.tensor_data.chunk.sizes.numel() * itemsize(dtype)
            progress = Progress(
                self.progress and self.is_coordinator,
                sum(f.size - len(f.header) for f in files),
                "dcp-hf save",
                own=total,
            )
            with ThreadPoolExecutor(self.thread_count, thread_name_prefix="dcp-hf-write") as pool:
                for done in pool.map(lambda task: task(), tasks):
                    progress.update(done)
            progress.close()
            for n, fd in fds.items():
                os.fsync(fd)
        except BaseException:
            self._discard(fds, rp)
            if self.is_coordinator:
                commit.release_lock(self._lock, rp.save_id)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)
        return self._result(total)

    def _slab_tasks(self, item, planner: SavePlanner, dtype: torch.dtype, fd: int, offset: int, file: str):
        """Tasks that each write up to ``io_chunk_bytes`` of the item's chunk, slicing it along
        dim 0 (a dtype conversion or copy to CPU is done one slab at a time). The chunk's data
        is resolved by its first task and released after its last, so a planner that produces
        data on demand holds only the items being written."""
        key, td = item.index.fqn, item.tensor_data
        shape, offsets, sizes = tuple(td.size), tuple(td.chunk.offsets), tuple(td.chunk.sizes)
        width = itemsize(dtype)
        rows = sizes[0] if sizes else 1
        step = max(1, self.io_chunk_bytes // max(math.prod(sizes[1:]) * width, 1))
        chunk = _ResolvedOnce(planner, item, -(-rows // step))

        def task(r0: int, r1: int):
            def run() -> int:
                tensor = chunk.acquire()
                try:
                    src = tensor[r0:r1] if sizes else tensor
                    if src.dtype != dtype or src.device.type != "cpu" or not src.is_contiguous():
                        src = src.to("cpu", dtype).contiguous()
                    box_off = (offsets[0] + r0,) + offsets[1:] if sizes else ()
                    box_size = (r1 - r0,) + sizes[1:] if sizes else ()
                    grid = box_runs(shape, box_off, box_size, width)
                    write_runs(fd, offset, grid, byte_view(src))
                except OSError as e:
                    raise StorageError(
                        e.errno, f"writing {key!r} to {os.path.join(self.path, file)}: {e.strerror}"
                    ) from e
                finally:
                    chunk.release()
                return grid.nbytes

            return run

        return [task(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def _write_parts(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Object stores: in rounds, send each part's bytes to its owner, which assembles and
        uploads it; then agree on the outcome (the coordinator aborts every upload on failure)."""
        rp: _RankPlan = plan.storage_data
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        me = dist.get_rank(group) if group is not None else 0
        by_file: dict[int, list[Part]] = {}
        for part in rp.parts:
            by_file.setdefault(part.file, []).append(part)
        rounds = max(p.round for p in rp.parts) + 1
        jobs, total = [], 0
        names = {n: f.name for n, f in enumerate(self._files)}
        for item in plan.items:
            n, offset = self._where[item.index.fqn]
            td = item.tensor_data
            dtype = self._files[n].specs[item.index.fqn].dtype
            grid = box_runs(tuple(td.size), tuple(td.chunk.offsets), tuple(td.chunk.sizes), itemsize(dtype))
            lo, hi = grid.span()
            touched = [p for p in by_file[n] if p.lo < offset + hi and offset + lo < p.hi]
            jobs.append((item, n, offset, dtype, grid, touched, {p.round for p in touched}))
            total += grid.nbytes
        progress = Progress(
            self.progress and self.is_coordinator,
            sum(p.hi - p.lo for p in rp.parts),
            "dcp-hf upload",
            own=sum(p.hi - p.lo for p in rp.parts if p.owner == me),
        )
        failure, cache = None, {}
        uploader = Uploader(
            self.target, names, rp.uploads, 1 if self.target.sequential else self.thread_count, self.round_bytes
        )
        try:
            for r in range(rounds):
                outgoing: dict[int, list] = {}
                pieces: dict[Part, list] = {}
                if failure is None:
                    try:
                        for item, n, offset, dtype, grid, touched, item_rounds in jobs:
                            if r not in item_rounds:
                                continue
                            src = cache.get(item.index)
                            if src is None:
                                src = cache[item.index] = self._contiguous(planner, item, dtype)
                            for part in (p for p in touched if p.round == r):
                                for c in clip_runs(n, offset, grid, src, part.lo, part.hi):
                                    if part.owner == me:
                                        pieces.setdefault(part, []).append(c)
                                    else:
                                        outgoing.setdefault(part.owner, []).append(c)
                            if max(item_rounds) == r:
                                cache.pop(item.index, None)
                    except Exception as e:  # keep taking part in the exchange: others wait on it
                        failure, outgoing = e, {}
                received = exchange(outgoing, group, world) if group is not None else []
                for c in received:
                    pieces.setdefault(part_of(by_file, c.file, c.offset), []).append(c)
                if failure is None:
                    try:
                        for p in rp.parts:  # uploads go on while the next round is gathered
                            if p.round == r and p.owner == me:
                                header = self._files[p.file].header if p.file in rp.headers else b""
                                uploader.submit(p, assemble(p, header, pieces.get(p, [])))
                                progress.update(p.hi - p.lo)
                        del pieces, received
                    except Exception as e:
                        failure = e
            if failure is None:
                try:
                    etags = uploader.etags()
                    self.target.close_local()
                except Exception as e:
                    failure = e
            progress.close()
            failed = torch.tensor([0 if failure is None else 1])
            if group is not None:
                dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
            if int(failed):
                raise failure or RuntimeError(
                    "another rank failed while uploading (see its error); every upload of this save was aborted"
                )
        except BaseException:
            uploader.close()
            self.target.discard_local()
            if self.is_coordinator:
                self._abort_uploads()
            raise
        finally:
            uploader.close()
        return self._result(total, etags)

    @staticmethod
    def _contiguous(planner: SavePlanner, item, dtype: torch.dtype) -> torch.Tensor:
        tensor = resolve_chunk(planner, item)
        if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.to("cpu", dtype).contiguous()
        return tensor

    def _discard(self, fds: dict[int, int], rp: _RankPlan) -> None:
        for n in fds:
            try:
                os.unlink(os.path.join(rp.work, partial_name(self._files[n].name, rp.save_id)))
            except OSError:
                pass

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.target is not None:
            return self._complete_uploads(results)
        try:
            self._commit_local()
        finally:
            commit.release_lock(self._lock, self._save_id)
        nbytes = sum(r.size_in_bytes for rank_results in results for r in rank_results)
        log_throughput("saved", nbytes, time.perf_counter() - self._start, self.path)

    def _commit_local(self) -> None:
        """Name the files, write the index, then make the folder the new checkpoint: with one
        exchange of the staging folder, or (no staging possible) file by file in place."""
        files, dest, save_id = self._files, self._dest, self._save_id
        work = dest.work
        for f in files:
            try:
                size = os.lstat(os.path.join(work, partial_name(f.name, save_id))).st_size
            except FileNotFoundError:
                size = None
            if size != f.size:
                raise StorageError(
                    f"{os.path.join(dest.path, f.name)}: expected {f.size} bytes after all "
                    f"ranks wrote, found {size}; not committing the checkpoint"
                )
        for name, data in self.side_files.items():
            commit.write_new_file(work, name, data)
        old = set(self._old) if not dest.staged else set()
        if len(files) == 1 and INDEX_NAME in old:  # never leave an old index that would shadow the new file
            commit.step(f"remove {INDEX_NAME}")
            os.unlink(os.path.join(work, INDEX_NAME))
            old.discard(INDEX_NAME)
        for f in files:
            commit.step(f"rename {f.name}")
            os.rename(os.path.join(work, partial_name(f.name, save_id)), os.path.join(work, f.name))
        fsync_dir(work)
        if len(files) > 1:
            weight_map = {key: f.name for f in files for key in f.offsets}
            total = sum(f.size - len(f.header) for f in files)
            commit.write_new_file(work, INDEX_NAME, encode_index(total, weight_map, save_id))
        if dest.staged:
            commit.commit(dest, save_id)
            return
        new_names = {f.name for f in files} | ({INDEX_NAME} if len(files) > 1 else set())
        for stale in old - new_names:
            commit.step(f"remove {stale}")
            os.unlink(os.path.join(work, stale))
        fsync_dir(work)

    def _complete_uploads(self, results: list[list[WriteResult]]) -> None:
        """Object stores: complete every upload (each object appears whole, atomically), then
        write the index last; stale objects of a replaced checkpoint go after it."""
        etags: dict[int, list[tuple[int, str]]] = {}
        for rank_results in results:
            for r in rank_results:
                if r.index.fqn == _RESULT and r.storage_data:
                    for n, number, etag in r.storage_data:
                        etags.setdefault(n, []).append((number, etag))
        try:
            for n, f in enumerate(self._files):
                commit.step(f"complete {f.name}")
                self.target.complete(f.name, self._uploads[n], etags.get(n, []), f.size)
                del self._uploads[n]
        except BaseException:
            self._abort_uploads()
            raise
        for name, data in self.side_files.items():
            commit.step(f"put {name}")
            self.target.put(name, data)
        old = set(self._old)
        if len(self._files) == 1 and INDEX_NAME in old:
            commit.step(f"delete {INDEX_NAME}")
            self.target.delete(INDEX_NAME)
            old.discard(INDEX_NAME)
        if len(self._files) > 1:
            weight_map = {key: f.name for f in self._files for key in f.offsets}
            total = sum(f.size - len(f.header) for f in self._files)
            commit.step(f"put {INDEX_NAME}")
            self.target.put(INDEX_NAME, encode_index(total, weight_map, self._save_id))
        new_names = {f.name for f in self._files} | ({INDEX_NAME} if len(self._files) > 1 else set())
        for stale in old - new_names:
            commit.step(f"delete {stale}")
            self.target.delete(stale)
        nbytes = sum(r.size_in_bytes for rank_results in results for r in rank_results)
        log_throughput("saved", nbytes, time.perf_counter() - self._start, self.path)

    # -- helpers ------------------------------------------------------------------------------
    def _check_destination(self) -> set[str]:
        """The HF checkpoint files already in the destination; refuse to replace them unless
        asked to. Leftovers of failed local saves are dropped."""
        try:
            names = self.store.list() if self.store.is_folder() else []
        except FileNotFoundError:
            names = []
        existing = {n for n in names if n == INDEX_NAME or _SHARD_FILE.match(n)}
        if existing and not self.overwrite:
            raise CheckpointExistsError(
                f"{self.path} already holds a checkpoint ({', '.join(sorted(existing)[:3])}...); "
                f"pass overwrite=True to HFStorageWriter to replace it"
            )
        if self.target is None:
            for name in names:
                if _PARTIAL.match(name):
                    os.unlink(os.path.join(self.path, name))
        else:
            self.target.abort_leftovers()
        return existing
