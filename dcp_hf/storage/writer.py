"""HFStorageWriter: DCP writes a standard HF safetensors checkpoint, each rank writing its own
bytes straight into their final place.

The coordinator decides the whole checkpoint in ``prepare_global_plan``: which tensor goes in
which file (huggingface_hub's grouping under ``max_shard_size``), every header and every byte
offset, and which byte ranges go through *parts* that one rank assembles from the others'
bytes (:mod:`.exchange`). Each rank then writes its chunks' runs, or its share of the parts,
through the back end's sink (:mod:`.sink`: local files, S3 multipart, other fsspec URLs), and
the coordinator commits in ``finish``: every file complete, side files, the index last, then
the sink publishes (locally one atomic exchange of the whole folder, see :mod:`.commit`).
Every file and the index carry the save's id, so readers refuse a mix.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_hf import training_state
from dcp_hf.boxes import RunGrid, box_runs, byte_view
from dcp_hf.contract import COMPACT_PLANS, MergedPlan, decode_table, encode_table, merged_plan, tensor_data
from dcp_hf.errors import (
    CheckpointExistsError,
    DcpHfError,
    Fix,
    PeerRankError,
    StateDictMismatchError,
    StorageError,
    not_a_tensor,
)
from dcp_hf.format import INDEX_NAME, FileLayout, TensorSpec, encode_index, parse_size
from dcp_hf.format.digests import BlockSums, combine
from dcp_hf.format.dtypes import itemsize, name_from_dtype
from dcp_hf.format.index import CHECKPOINT_FILE, FILE_PATTERN, SINGLE_FILE_NAME, fresh_name, layout_files
from dcp_hf.progress import Progress, log_throughput
from dcp_hf.storage.exchange import (
    Holding,
    Part,
    PartBytes,
    PartIndex,
    PartWriter,
    Region,
    Rounds,
    assemble,
    collective_device,
    end_round,
    exchange,
    open_shared,
    pieces_in,
    plan_parts,
)
from dcp_hf.storage.hf_files import HFFiles
from dcp_hf.storage.sink import Sink, open_sink
from dcp_hf.storage.staging import SLOT_BYTES, Slab, Stager, pump
from dcp_hf.storage.stores import open_store

logger = logging.getLogger("dcp_hf")

DtypePolicy = torch.dtype | Callable[[str, torch.dtype], torch.dtype] | None
EXCHANGE_BELOW = 256 << 10  # runs shorter than this go through parts where short writes are costly
RANK_RESULT = "__dcp_hf_rank__"  # each rank's one WriteResult: its bytes, part receipts, digest sums


@dataclass
class RankWrites:
    """What a rank tells the coordinator's ``finish`` (its WriteResult's ``storage_data``): the
    receipts of the parts it wrote, (file, part number, receipt), and its share of the files'
    block digests (``BlockSums.sums``), hashed from the bytes as it wrote them."""

    receipts: list
    digest_sums: dict


@dataclass
class WritePlan:
    """What one rank needs to write its share (``SavePlan.storage_data``). Every rank lays out
    the files itself from the table, exactly as the coordinator did, so the message stays
    small however many tensors and ranks there are."""

    save_id: str
    table: dict  # every tensor of the checkpoint (export dtypes), see summary.encode_table
    headers: set[int]  # files whose header this rank writes
    parts: list[Part]  # every part of the save, with its owner and round (may be none)
    opened: Any  # what the sink's ``begin`` returned (created files, upload ids)
    world: int  # ranks in the save (1: no collectives, e.g. ``dcp.save(no_dist=True)``)
    names: list[str]  # each file's name (see ``stored_names``)


@dataclass(frozen=True)
class ChunkWrite:
    """A write item placed in its file: the tensor's data starts at byte ``base`` of file
    number ``file``; the chunk's bytes (in ``dtype``) are the runs ``grid``."""

    item: WriteItem
    file: int
    base: int
    dtype: torch.dtype
    grid: RunGrid


# Chunks resolved ahead of the one being written. Resolving may compute (a transpose when
# splitting experts, a cast, a quantization): two chunks at once keep both cores of a small
# machine busy beside the writes, and hold at most two chunks' copies more.
RESOLVE_AHEAD = 2


def resolved_ahead(planner: SavePlanner, chunks: list) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(chunk, resolve_chunk(planner, chunk.item))`` in order, the next ``RESOLVE_AHEAD``
    chunks resolved on threads meanwhile (DCP's own writer also calls ``resolve_data`` from
    several threads). An error is raised when its chunk's turn comes; on an early exit the
    chunks not yet started are cancelled and the running ones waited for."""
    # CUDA work the planner does (a cast) goes on the caller's stream, ordered after whatever
    # the caller queued there, as if it were resolved on the caller's thread.
    stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None

    def resolve(item) -> torch.Tensor:
        if stream is None:
            return resolve_chunk(planner, item)
        with torch.cuda.stream(stream):
            return resolve_chunk(planner, item)

    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(RESOLVE_AHEAD, thread_name_prefix="dcp-hf-resolve") as pool:
        try:
            for c in chunks:
                pending.append((c, pool.submit(resolve, c.item)))
                if len(pending) > RESOLVE_AHEAD:
                    first, fut = pending.popleft()
                    yield first, fut.result()
            while pending:
                first, fut = pending.popleft()
                yield first, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


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


def host_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as a contiguous CPU tensor of ``dtype`` (no copy when it already is one)."""
    if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu", dtype).contiguous()
    return tensor


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
        part_size: size of the parts that ranks assemble from each other's bytes: on S3 every
            file goes in parts (multipart, at least 5 MiB); on a file system the tensors whose
            chunks have runs shorter than ``exchange_below`` (column shards) do.
        round_bytes: the most bytes of parts a rank assembles at once.
        exchange_below: on a file system, chunks whose contiguous runs are shorter than this
            are sent to the rank that writes their part, which writes it as one long run.
            Default: 256 KiB where the file system cannot map short runs (each would be one
            ``pwrite``, a round trip on NFS), none where it can (a local disk: ranks store
            their runs side by side through a shared mapping, at memory speed).
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
        digests: record the CRC-32C of every 4 MiB block of every file in the index (each rank
            hashes the bytes it writes, as it writes them), for ``HFStorageReader(verify=True)``
            and ``dcp-hf verify``; a single-file save has no index, so no digests.
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
        exchange_below: int | str | None = None,
        side_files: dict[str, bytes] | None = None,
        config=None,
        copy_from: str | os.PathLike | None = None,
        file_map_from: str | os.PathLike | None = None,
        digests: bool = True,
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
        self.process_group = process_group
        self.part_size = parse_size(part_size)
        self.round_bytes = parse_size(round_bytes)
        self.exchange_below = None if exchange_below is None else parse_size(exchange_below)
        self.max_shard_size = parse_size(max_shard_size)
        self.dtype = dtype
        self.digests = digests
        self.overwrite = overwrite
        self.progress = progress
        self.thread_count = thread_count or (8 if self.store.remote else 2)
        self.io_chunk_bytes = io_chunk_bytes
        # Host buffers that device tensors (and casts, strided views) are staged through,
        # pinned on first CUDA use: a few slots of 16 MiB keep the copies ahead of the writes.
        self._stager = Stager(
            slots=self.thread_count + 2, slot_bytes=min(io_chunk_bytes, SLOT_BYTES), cpu_threads=self.thread_count
        )
        self.is_coordinator = False
        self._files: list[FileLayout] = []
        self._where: dict[str, tuple[int, int]] = {}  # key -> (file number, data offset)
        self._model_files = 0  # the first files are the model's, the rest the training state's
        self._save_id = ""
        self._start = 0.0
        self._old: set[str] = set()
        self._taken: set[str] = set()  # the destination's names when the save began
        self._sink: Sink | None = None  # the coordinator's, from prepare_global_plan to finish
        self.bytes_from_other_hosts = 0  # bytes of parts this rank received over the process group

    # -- DCP protocol -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
            self.store = open_store(self.path, self.storage_options)

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
            name_from_dtype(self.export_dtype(key, tensor_data(item).properties.dtype), key=key)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        merged = merged_plan(plans)
        specs = []
        for key, (shape, dtype) in merged.table.items():
            export = self.export_dtype(key, dtype)
            name_from_dtype(export, key=key)
            specs.append(TensorSpec(key, export, shape))
        if not specs:
            raise StateDictMismatchError("the state dict holds no tensors: nothing to save")
        tied = self.hf_files.tied(s.key for s in specs if not training_state.is_training_state(s.key))
        specs = [s for s in specs if s.key not in tied]
        self.side_files = {**self.hf_files.side_files(), **self.side_files}

        table = encode_table(specs)
        save_id = uuid.uuid4().hex[:12]
        files = self._lay_out(table, save_id)  # checks every name before anything is touched
        sink = self._sink = open_sink(self.store)
        sink.prepare(save_id)
        try:
            existing = sink.existing()
            self._old, self._taken = self._check_existing(existing), set(existing)
            files = self._lay_out(table, save_id, stored_names(files, self._taken, save_id))
            opened = sink.begin(files)
            parts = self._plan_parts(merged, files, len(plans), sink)
        except BaseException:
            sink.abort()
            raise
        # Each file's header is written by the owner of its first part, else by the rank that
        # writes the file's first data bytes.
        header_owner = {
            n: merged.writer_of(key, (0,) * len(f.specs[key].shape))
            for n, f in enumerate(files)
            for key in list(f.offsets)[:1]
        }
        header_owner.update({p.file: p.owner for p in parts if p.lo == 0})
        return [
            dataclasses.replace(
                plan,
                storage_data=WritePlan(
                    save_id=save_id,
                    table=table,
                    headers={n for n, r in header_owner.items() if r == rank},
                    parts=parts,
                    opened=opened,
                    world=len(plans),
                    names=[f.name for f in files],
                ),
            )
            for rank, plan in enumerate(plans)
        ]

    def _lay_out(self, table: dict, save_id: str, names: list[str] | None = None) -> list[FileLayout]:
        """The files of the checkpoint (what goes where), the same on every rank; ``names``:
        the names they are stored under (the coordinator's choice, see ``stored_names``)."""
        if self._save_id != save_id:
            specs = decode_table(table)
            state = [s for s in specs if training_state.is_training_state(s.key)]
            model = [s for s in specs if not training_state.is_training_state(s.key)]
            self._files = self.hf_files.lay_out(model, self.max_shard_size, save_id)
            self._model_files = len(self._files)  # the training state's files follow the model's
            if state:
                if self._files[0].name == SINGLE_FILE_NAME:  # a training checkpoint's model goes by its index
                    self._files[0].name = FILE_PATTERN.format(suffix="-00001-of-00001")
                self._files += layout_files(state, self.max_shard_size, save_id, training_state.FILE_PATTERN)
            self._where = {key: (n, offset) for n, f in enumerate(self._files) for key, offset in f.offsets.items()}
            self._save_id = save_id
        for f, name in zip(self._files, names or []):
            f.name = name
        return self._files

    def _plan_parts(self, merged: MergedPlan, files: list[FileLayout], world: int, sink: Sink) -> list[Part]:
        """The byte ranges that go through parts, and their owners: every file where the sink
        takes only parts; on a file system, the tensors whose chunks have short runs (a cost
        model: the exchange costs a copy and a transfer, short interleaved writes cost far more)."""
        below = self.exchange_below
        if below is None:  # local disks map short runs at memory speed; elsewhere each is a write
            below = 0 if sink.short_runs_cheap else EXCHANGE_BELOW
        regions: list[Region] = []
        holdings: list[Holding] = []
        exchanged: set[str] = set()
        for writer in merged.writers():
            keys, (offsets, sizes) = writer.keys, writer.box
            if sink.direct:  # one decision per box of keys of one shape (not per chunk: 10^7 at scale)
                first = next((k for k in keys if k in self._where), None)  # tied weights are left out
                if first is None:
                    continue
                n, _ = self._where[first]
                spec = files[n].specs[first]
                grid = box_runs(spec.shape, offsets, sizes, itemsize(spec.dtype))
                if not (world > 1 and 0 < grid.run_len < below and grid.num_runs > 1):
                    continue
            for key in keys:
                if key not in self._where:
                    continue
                n, base = self._where[key]
                spec = files[n].specs[key]
                grid = box_runs(spec.shape, offsets, sizes, itemsize(spec.dtype))
                lo, hi = grid.span()
                holdings.append(Holding(writer.rank, n, base + lo, base + hi, grid.nbytes))
                exchanged.add(key)
        if not holdings:
            return []
        if sink.direct:
            for n, f in enumerate(files):
                for key, base in f.offsets.items():
                    if key in exchanged:
                        hi = base + f.specs[key].nbytes
                        if regions and regions[-1].file == n and regions[-1].hi == base:
                            regions[-1] = dataclasses.replace(regions[-1], hi=hi)
                        else:
                            regions.append(Region(n, base, hi, self.part_size))
        else:
            for n, f in enumerate(files):
                width = max(self.part_size, sink.min_part, -(-f.size // sink.max_parts))
                regions.append(Region(n, 0, f.size, width))
        return plan_parts(regions, holdings, self.round_bytes, whole_files=sink.sequential)

    def _result(self, nbytes: int, writes: RankWrites) -> Future[list[WriteResult]]:
        """A rank's one write result (one per item would grow with ranks x tensors)."""
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([WriteResult(index=MetadataIndex(RANK_RESULT), size_in_bytes=nbytes, storage_data=writes)])
        return fut

    def _group(self, world: int):
        """The process group of a save of ``world`` ranks (None for one rank)."""
        if world == 1:
            return None, 1, 0
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) != world:
            raise DcpHfError(
                f"{self.path}: the save has {world} ranks but the writer's process group has "
                f"{dist.get_world_size(group)}: pass the group given to dcp.save as "
                f"HFStorageWriter(process_group=...)"
            )
        return group, world, dist.get_rank(group)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        wp: WritePlan = plan.storage_data
        files = self._lay_out(wp.table, wp.save_id, wp.names)
        plan = self.hf_files.drop_tied(plan, planner, self._where)
        group, world, me = self._group(wp.world)
        sink = self._sink if self.is_coordinator and self._sink is not None else open_sink(self.store)
        index = PartIndex(wp.parts)
        direct: list[ChunkWrite] = []
        through_parts: list[ChunkWrite] = []
        for item in plan.items:
            n, base = self._where[item.index.fqn]
            td, dtype = tensor_data(item), files[n].specs[item.index.fqn].dtype
            grid = box_runs(tuple(td.size), tuple(td.chunk.offsets), tuple(td.chunk.sizes), itemsize(dtype))
            if grid.nbytes == 0:  # an empty tensor: its header entry is all there is
                continue
            chunk = ChunkWrite(item, n, base, dtype, grid)
            (through_parts if index.covers(n, base + grid.start) else direct).append(chunk)
        mine = [p for p in wp.parts if p.owner == me]
        own = sum(c.grid.nbytes for c in direct) + sum(p.hi - p.lo for p in mine)
        progress = Progress(
            self.progress and self.is_coordinator, sum(f.size - len(f.header) for f in files), "dcp-hf save", own=own
        )
        failure: BaseException | None = None
        receipts: list = []
        sums = BlockSums([f.size for f in files], on=self.digests)
        try:
            numbers = {c.file for c in direct} | {p.file for p in mine} | (wp.headers if sink.direct else set())
            sink.open(wp.opened, files, wp.save_id, numbers)
            if sink.direct:
                for n in wp.headers:
                    sink.write_runs(n, 0, RunGrid(0, len(files[n].header)), memoryview(files[n].header))
                    sums.add_bytes(n, 0, files[n].header)
            self._write_direct(direct, planner, sink, progress, sums)
        except Exception as e:  # noqa: BLE001 - the other ranks learn of it below
            failure = e
        if wp.parts:
            failure, receipts = self._write_parts(through_parts, planner, sink, wp, index, failure, progress, sums)
        if failure is None:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                failure = e
        progress.close()
        if self._any_failed(failure, group):
            sink.discard()
            if self.is_coordinator:
                sink.abort()
            raise failure or PeerRankError(
                "another rank failed while writing (see its error); nothing of this save was committed"
            )
        return self._result(sum(c.grid.nbytes for c in direct + through_parts), RankWrites(receipts, sums.sums))

    @staticmethod
    def _any_failed(failure: BaseException | None, group) -> bool:
        """Whether any rank failed (all ranks learn it, so the coordinator aborts the save)."""
        if group is None:
            return failure is not None
        failed = torch.tensor([0 if failure is None else 1], device=collective_device(group))
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        return bool(int(failed))

    def _write_direct(
        self, chunks: list[ChunkWrite], planner: SavePlanner, sink: Sink, progress: Progress, sums: BlockSums
    ) -> None:
        """Write each chunk's runs, in pieces of at most ``io_chunk_bytes`` staged through the
        writer's ring of host buffers (a device-to-host copy or dtype conversion overlaps the
        writes), hashing each piece into ``sums`` as it is written; the next chunks are
        resolved on threads meanwhile (``resolved_ahead``)."""

        def slabs():
            for c, tensor in resolved_ahead(planner, chunks):
                yield Slab(tensor, c.dtype, c)

        def write(piece) -> int:
            c: ChunkWrite = piece.tag
            td = tensor_data(c.item)
            box = tuple(o + p for o, p in zip(td.chunk.offsets, piece.offsets))
            grid = box_runs(tuple(td.size), box, piece.sizes, itemsize(c.dtype))
            try:
                sink.write_runs(c.file, c.base, grid, piece.data)
            except OSError as e:  # the sink names the file; name the tensor too
                raise StorageError(e.errno, f"{c.item.index.fqn!r}: {e.strerror or e}") from e
            sums.add(c.file, c.base, grid, piece.data)
            return grid.nbytes

        with ThreadPoolExecutor(self.thread_count, thread_name_prefix="dcp-hf-write") as pool:
            for done in pump(self._stager.save(slabs()), write, pool):
                progress.update(done)

    def _write_parts(
        self,
        chunks: list[ChunkWrite],
        planner: SavePlanner,
        sink: Sink,
        wp: WritePlan,
        index: PartIndex,
        failure: BaseException | None,
        progress: Progress,
        sums: BlockSums,
    ) -> tuple[BaseException | None, list]:
        """In rounds, send each part's bytes to its owner, which assembles and writes it (the
        writes go on while the next round is gathered). A rank that failed keeps taking part
        in the rounds, sending nothing, so no rank waits forever (:class:`Rounds`)."""
        group, world, me = self._group(wp.world)
        feed = _ChunkPieces(chunks, index, planner)
        rounds, n_rounds = Rounds(failure), max(p.round for p in wp.parts) + 1

        def write_part(part: Part, data: torch.Tensor):
            try:
                receipt = sink.write_part(part, data)
            except OSError as e:  # the sink names the file; name the tensors in the part too
                raise StorageError(e.errno, f"{', '.join(map(repr, self._keys_in(part)))}: {e.strerror or e}") from e
            sums.add_bytes(part.file, part.lo, byte_view(data))
            return receipt

        writer = PartWriter(write_part, 1 if sink.sequential else self.thread_count, self.round_bytes)
        receipts: list = []
        shared = None
        try:
            if world > 1:  # ranks on one host pass the bytes through shared memory
                shared = open_shared(feed.most_sent(me), group, me, world, f"dcp-hf-save-{wp.save_id}")
            for r in range(n_rounds):
                nothing: tuple[dict[Part, list[PartBytes]], dict[int, list[PartBytes]]] = ({}, {})
                mine, outgoing = rounds.attempt(lambda: feed.pieces(r, me), nothing)
                received, remote = exchange(outgoing, group, world, shared) if group is not None else ([], 0)
                self.bytes_from_other_hosts += remote
                for piece in received:
                    mine.setdefault(index.of(piece.file, piece.offset), []).append(piece)
                owned = [p for p in wp.parts if p.round == r and p.owner == me]
                rounds.attempt(lambda: self._submit_parts(owned, mine, writer, progress), None)
                mine.clear()  # the pieces' memory, before the next round's
                received.clear()
                end_round(group, shared)
            receipts = rounds.attempt(writer.receipts, [])
        finally:
            writer.close()
            if shared is not None:
                shared.close()
        return rounds.failure, receipts

    def _submit_parts(self, parts: list[Part], pieces: dict[Part, list], writer: PartWriter, progress) -> None:
        """Assemble each of ``parts`` from its pieces and hand it to the part writer."""
        for p in parts:
            header = part_header(self._files[p.file], p)
            writer.submit(p, assemble(p, header, pieces.get(p, [])))
            progress.update(p.hi - p.lo)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The one commit sequence: every file complete under a name no file had, side files,
        the training state's index, then the model index (the commit, or ``model.safetensors``
        alone), then the sink publishes: the replaced checkpoint's files are removed."""
        sink, files = self._sink, self._files
        if sink is None:
            raise StorageError(f"{self.path}: finish on a writer whose prepare_global_plan did not run")
        receipts: dict[int, list] = {}
        digest_sums = []
        for rank_results in results:
            for r in rank_results:
                if r.index.fqn == RANK_RESULT:
                    for n, number, receipt in r.storage_data.receipts:
                        receipts.setdefault(n, []).append((number, receipt))
                    digest_sums.append(r.storage_data.digest_sums)
        try:
            digests = combine(digest_sums, [f.name for f in files], [f.size for f in files]) if self.digests else {}
            sink.complete(receipts)
            for name, data in self.side_files.items():
                if not self._holds(name, data):  # unchanged: readers never see it change
                    sink.put(name, data)
            model, state = files[: self._model_files], files[self._model_files :]
            state_index = None
            if state:  # named by the model index: its one rename commits the training state too
                state_index = stored_names([training_state.INDEX_NAME], self._taken, self._save_id)[0]
                sink.put(state_index, self._index(state, digests=digests))
            # A training checkpoint always has the model's index: readers that list the
            # folder's *.safetensors (vLLM) then keep to the files it names.
            if len(model) > 1 or state:
                sink.put(INDEX_NAME, self._index(model, state_index, digests))
            names = {f.name for f in files} | {INDEX_NAME if len(model) > 1 or state else None, state_index}
            sink.publish(self._old - names)
        except BaseException:
            sink.abort()
            raise
        finally:
            self._sink = None
        nbytes = sum(r.size_in_bytes for rank_results in results for r in rank_results)
        log_throughput("saved", nbytes, time.perf_counter() - self._start, self.path)

    # -- helpers ------------------------------------------------------------------------------
    def _holds(self, name: str, data: bytes) -> bool:
        """Whether the destination holds ``name`` with exactly these bytes (a side file that an
        earlier save wrote: not rewritten, so a save's side files change only when they differ)."""
        if name not in self._taken:
            return False
        try:
            return self.store.read(name) == data
        except (OSError, DcpHfError):
            return False

    def _index(self, files: list[FileLayout], training_state_index: str | None = None, digests=None) -> bytes:
        """The index json of ``files``, with their block digests (``digests``: file -> FileDigest)."""
        weight_map = {key: f.name for f in files for key in f.offsets}
        total = sum(f.size - len(f.header) for f in files)
        recorded = {f.name: digests[f.name] for f in files if digests and f.name in digests}
        return encode_index(total, weight_map, self._save_id, training_state_index, recorded)

    def _keys_in(self, part: Part) -> list[str]:
        """The tensors whose data overlaps the part (for error messages)."""
        f = self._files[part.file]
        return [key for key, base in f.offsets.items() if base < part.hi and base + f.specs[key].nbytes > part.lo]

    def _check_existing(self, names: list[str]) -> set[str]:
        """The checkpoint files already in the destination (HF's, or a DCP checkpoint's, which
        would otherwise stay beside the new files); refuse to replace them unless asked to."""
        existing = {n for n in names if CHECKPOINT_FILE.match(n)}
        if existing and not self.overwrite:
            raise CheckpointExistsError(
                f"{self.path} already holds a checkpoint ({', '.join(sorted(existing)[:3])}...)",
                fix=Fix("overwrite", "pass overwrite=True to HFStorageWriter to replace it"),
            )
        return existing


class _ChunkPieces:
    """The pieces of this rank's chunks that go to parts, round by round: a chunk's host bytes
    are made at the first round that needs them and dropped after its last."""

    def __init__(self, chunks: list[ChunkWrite], index: PartIndex, planner: SavePlanner):
        self.planner = planner
        self.parts_of = {
            id(c): index.overlapping(c.file, c.base + c.grid.span()[0], c.base + c.grid.span()[1]) for c in chunks
        }
        self.chunks = chunks
        self.last_round = {id(c): max((p.round for p in self.parts_of[id(c)]), default=-1) for c in chunks}
        self.held: dict[int, torch.Tensor] = {}

    def most_sent(self, me: int) -> int:
        """The most bytes rank ``me`` sends other ranks in one round."""
        sent: dict[int, int] = {}
        for c in self.chunks:
            for p in self.parts_of[id(c)]:
                if p.owner != me:
                    n = sum(g.nbytes for g, _ in c.grid.clip(p.lo - c.base, p.hi - c.base))
                    sent[p.round] = sent.get(p.round, 0) + n
        return max(sent.values(), default=0)

    def pieces(self, round_no: int, me: int) -> tuple[dict[Part, list[PartBytes]], dict[int, list[PartBytes]]]:
        """This round's pieces of the parts ``me`` owns, and those to send, by owner."""
        mine: dict[Part, list[PartBytes]] = {}
        outgoing: dict[int, list[PartBytes]] = {}
        for c in self.chunks:
            parts = [p for p in self.parts_of[id(c)] if p.round == round_no]
            if not parts:
                continue
            src = self.held.get(id(c))
            if src is None:
                src = self.held[id(c)] = host_bytes(resolve_chunk(self.planner, c.item), c.dtype)
            for part in parts:
                for piece in pieces_in(c.file, c.base, c.grid, src, part.lo, part.hi):
                    if part.owner == me:
                        mine.setdefault(part, []).append(piece)
                    else:
                        outgoing.setdefault(part.owner, []).append(piece)
            if self.last_round[id(c)] == round_no:
                del self.held[id(c)]
        return mine, outgoing


def stored_names(names, taken: set[str], save_id: str) -> list[str]:
    """The names a save stores its files under: each standard name where the destination has
    no file of that name, else the name with the save's id (``fresh_name``); so a save never
    rewrites a file the checkpoint it replaces names, and every reader keeps loading that one
    until the new index replaces the old. ``model.safetensors`` keeps its name: alone in a
    checkpoint, its own rename commits it. ``names``: names, or ``FileLayout``s."""
    out = []
    for name in (getattr(n, "name", n) for n in names):
        out.append(name if name not in taken or name == SINGLE_FILE_NAME else fresh_name(name, save_id))
    return out


def part_header(f: FileLayout, part: Part) -> bytes:
    """The file's header when the part holds (some of) it."""
    return f.header if part.lo < len(f.header) else b""
