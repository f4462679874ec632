"""HFStorageWriter: DCP writes a standard HF safetensors checkpoint, each rank writing its own
bytes straight into their final place.

The coordinator decides the whole checkpoint in ``prepare_global_plan``: which tensor goes in
which file (huggingface_hub's grouping under ``max_shard_size``), every header and every byte
offset. Each rank then ``pwrite``s its chunks' byte runs into the files (hidden ``.partial``
names), fsyncs them, and the coordinator commits in ``finish``: renames, then the index json.
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
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_hf.boxes import box_runs, check_exact_cover
from dcp_hf.errors import CheckpointExistsError, StateDictMismatchError
from dcp_hf.format import INDEX_NAME, encode_index, layout_files, parse_size
from dcp_hf.format.dtypes import itemsize, name_from_dtype
from dcp_hf.planners.checks import tensor_specs
from dcp_hf.progress import Progress, log_throughput
from dcp_hf.storage.posix import byte_view, fsync_dir, pwrite_all, write_file_atomic, write_runs

logger = logging.getLogger("dcp_hf")

DtypePolicy = torch.dtype | Callable[[str, torch.dtype], torch.dtype] | None
_PARTIAL = re.compile(r"^\.(.+)\.([0-9a-f]{12})\.partial$")
_SHARD_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def natural_key(key: str):
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


@dataclass
class _RankPlan:
    """What one rank needs to write its part (travels in ``SavePlan.storage_data``)."""

    save_id: str
    files: dict[int, str]  # file number -> final file name
    headers: dict[int, bytes]  # headers this rank writes
    locations: dict[MetadataIndex, tuple[int, int]]  # item -> (file number, data offset)


class _ResolvedOnce:
    """An item's data, resolved by the planner on first use and dropped after ``uses`` uses."""

    def __init__(self, planner: SavePlanner, item, sizes: tuple[int, ...], uses: int):
        self.planner, self.item, self.sizes, self.uses = planner, item, sizes, uses
        self.tensor: torch.Tensor | None = None
        self.lock = threading.Lock()

    def acquire(self) -> torch.Tensor:
        with self.lock:
            if self.tensor is None:
                tensor = self.planner.resolve_data(self.item)
                key = self.item.index.fqn
                if not isinstance(tensor, torch.Tensor):
                    raise StateDictMismatchError(f"{key!r}: the planner returned no tensor")
                if tensor.device.type == "meta":
                    raise StateDictMismatchError(f"{key!r} is a meta tensor: it has no data to save")
                if tuple(tensor.shape) != self.sizes:
                    raise StateDictMismatchError(
                        f"{key!r}: the planner returned shape {list(tensor.shape)} for a chunk of "
                        f"shape {list(self.sizes)}")
                self.tensor = tensor.detach()
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
            to (e.g. torch.bfloat16 for fp32 training state), or ``f(key, dtype) -> dtype``.
        overwrite: replace a checkpoint already in ``path``; its files that the new index does
            not name are removed after the new one is committed.
        progress: show a progress bar with bytes and GB/s on the coordinator.
        thread_count: writer threads per rank (writes to one file share its inode lock, so a
            few threads suffice; more help only with many files or slow dtype conversions).
    """

    def __init__(self, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                 dtype: DtypePolicy = None, overwrite: bool = False, progress: bool = False,
                 thread_count: int = 2, io_chunk_bytes: int = 64 << 20):
        super().__init__()
        self.path = os.fspath(path)
        self.max_shard_size = parse_size(max_shard_size)
        self.dtype = dtype
        self.overwrite = overwrite
        self.progress = progress
        self.thread_count = thread_count
        self.io_chunk_bytes = io_chunk_bytes
        self.is_coordinator = False
        self._files = []
        self._save_id = ""
        self._start = 0.0

    # -- DCP protocol -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return "://" not in os.fspath(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self._start = time.perf_counter()

    def export_dtype(self, key: str, dtype: torch.dtype) -> torch.dtype:
        if self.dtype is None:
            return dtype
        if callable(self.dtype) and not isinstance(self.dtype, torch.dtype):
            return self.dtype(key, dtype)
        if dtype.is_floating_point and itemsize(dtype) >= 2:
            return self.dtype
        return dtype

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        for item in plan.items:
            key = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                raise StateDictMismatchError(
                    f"{key!r} is not a tensor: an HF safetensors checkpoint holds tensors only "
                    f"(remove it from the state dict or save it elsewhere)")
            name_from_dtype(self.export_dtype(key, item.tensor_data.properties.dtype), key=key)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        specs = tensor_specs(plans, self.export_dtype)
        boxes: dict[str, list] = {}
        for rank, plan in enumerate(plans):
            for item in plan.items:
                chunk = item.tensor_data.chunk
                boxes.setdefault(item.index.fqn, []).append(
                    (tuple(chunk.offsets), tuple(chunk.sizes), f"rank {rank}"))
        for key, spec in specs.items():
            check_exact_cover(key, spec.shape, boxes[key])
        if not specs:
            raise StateDictMismatchError("the state dict holds no tensors: nothing to save")

        self._check_destination()
        files = layout_files([specs[k] for k in sorted(specs, key=natural_key)], self.max_shard_size)
        file_of = {key: n for n, f in enumerate(files) for key in f.offsets}
        save_id = uuid.uuid4().hex[:12]

        # The header of each file is written by the rank that writes most of its bytes.
        rank_bytes: dict[tuple[int, int], int] = {}
        for rank, plan in enumerate(plans):
            for item in plan.items:
                n = file_of[item.index.fqn]
                spec = files[n].specs[item.index.fqn]
                rank_bytes[rank, n] = rank_bytes.get((rank, n), 0) + (
                    item.tensor_data.chunk.sizes.numel() * itemsize(spec.dtype))
        header_owner = {}
        for (rank, n), nbytes in rank_bytes.items():
            if n not in header_owner or nbytes > rank_bytes[header_owner[n], n]:
                header_owner[n] = rank

        new_plans = []
        for rank, plan in enumerate(plans):
            locations = {}
            for item in plan.items:
                n = file_of[item.index.fqn]
                locations[item.index] = (n, files[n].offsets[item.index.fqn])
            mine = {n for n, _ in locations.values()} | {n for n, r in header_owner.items() if r == rank}
            new_plans.append(dataclasses.replace(plan, storage_data=_RankPlan(
                save_id=save_id,
                files={n: files[n].name for n in mine},
                headers={n: files[n].header for n in mine if header_owner[n] == rank},
                locations=locations)))
        self._files, self._save_id = files, save_id
        return new_plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rp: _RankPlan = plan.storage_data
        os.makedirs(self.path, exist_ok=True)
        fds: dict[int, int] = {}
        try:
            for n, name in rp.files.items():
                fds[n] = os.open(os.path.join(self.path, partial_name(name, rp.save_id)),
                                 os.O_RDWR | os.O_CREAT, 0o644)
            for n, header in rp.headers.items():
                pwrite_all(fds[n], memoryview(header), 0)
            tasks, results, total = [], [], 0
            for item in plan.items:
                n, offset = rp.locations[item.index]
                dtype = self.export_dtype(item.index.fqn, item.tensor_data.properties.dtype)
                tasks += self._slab_tasks(item, planner, dtype, fds[n], offset, rp.files[n])
                nbytes = item.tensor_data.chunk.sizes.numel() * itemsize(dtype)
                total += nbytes
                results.append(WriteResult(index=item.index, size_in_bytes=nbytes,
                                           storage_data=(rp.files[n], offset)))
            progress = Progress(self.progress and self.is_coordinator, total, "dcp-hf save")
            with ThreadPoolExecutor(self.thread_count, thread_name_prefix="dcp-hf-write") as pool:
                for done in pool.map(lambda task: task(), tasks):
                    progress.update(done)
            progress.close()
            for n, fd in fds.items():
                os.fsync(fd)
        except BaseException:
            self._discard(fds, rp)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _slab_tasks(self, item, planner: SavePlanner, dtype: torch.dtype, fd: int, offset: int,
                    file: str):
        """Tasks that each write up to ``io_chunk_bytes`` of the item's chunk, slicing it along
        dim 0 (a dtype conversion or copy to CPU is done one slab at a time). The chunk's data
        is resolved by its first task and released after its last, so a planner that produces
        data on demand holds only the items being written."""
        key, td = item.index.fqn, item.tensor_data
        shape, offsets, sizes = tuple(td.size), tuple(td.chunk.offsets), tuple(td.chunk.sizes)
        width = itemsize(dtype)
        rows = sizes[0] if sizes else 1
        step = max(1, self.io_chunk_bytes // max(math.prod(sizes[1:]) * width, 1))
        chunk = _ResolvedOnce(planner, item, sizes, -(-rows // step))

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
                    raise OSError(e.errno, f"writing {key!r} to {os.path.join(self.path, file)}: "
                                           f"{e.strerror}") from e
                finally:
                    chunk.release()
                return grid.nbytes
            return run

        return [task(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def _discard(self, fds: dict[int, int], rp: _RankPlan) -> None:
        for n in fds:
            try:
                os.unlink(os.path.join(self.path, partial_name(rp.files[n], rp.save_id)))
            except OSError:
                pass

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files, path = self._files, self.path
        for f in files:
            tmp = os.path.join(path, partial_name(f.name, self._save_id))
            size = os.stat(tmp).st_size if os.path.exists(tmp) else None
            if size != f.size:
                raise OSError(f"{os.path.join(path, f.name)}: expected {f.size} bytes after all "
                              f"ranks wrote, found {size}; not committing the checkpoint")
        old = self._existing_files()
        if len(files) == 1:
            if INDEX_NAME in old:  # never leave an old index that would shadow the new file
                os.unlink(os.path.join(path, INDEX_NAME))
                old.discard(INDEX_NAME)
            os.replace(os.path.join(path, partial_name(files[0].name, self._save_id)),
                       os.path.join(path, files[0].name))
        else:
            for f in files:
                os.replace(os.path.join(path, partial_name(f.name, self._save_id)),
                           os.path.join(path, f.name))
            fsync_dir(path)
            weight_map = {key: f.name for f in files for key in f.offsets}
            total = sum(f.size - len(f.header) for f in files)
            write_file_atomic(os.path.join(path, INDEX_NAME), encode_index(total, weight_map))
        new_names = {f.name for f in files} | ({INDEX_NAME} if len(files) > 1 else set())
        for stale in old - new_names:
            os.unlink(os.path.join(path, stale))
        fsync_dir(path)
        nbytes = sum(r.size_in_bytes for rank_results in results for r in rank_results)
        log_throughput("saved", nbytes, time.perf_counter() - self._start, path)

    # -- helpers ------------------------------------------------------------------------------
    def _existing_files(self) -> set[str]:
        """HF checkpoint files already in the destination (what a previous save committed)."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return set()
        return {n for n in names if n == INDEX_NAME or _SHARD_FILE.match(n)}

    def _check_destination(self) -> None:
        """Refuse to replace a checkpoint unless asked to; drop leftovers of failed saves."""
        existing = self._existing_files()
        if existing and not self.overwrite:
            raise CheckpointExistsError(
                f"{self.path} already holds a checkpoint ({', '.join(sorted(existing)[:3])}...); "
                f"pass overwrite=True to HFStorageWriter to replace it")
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if _PARTIAL.match(name):
                    os.unlink(os.path.join(self.path, name))
