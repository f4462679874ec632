"""The streaming engine of the offline tools (``convert``, ``experts``, Megatron ``export`` and
``import``): ``dcp.save`` of a state dict of meta tensors (shapes and dtypes only) whose boxes are
read from a source checkpoint only when the writer asks for them, through the source layout, in
stripes of whole source rows read ahead of the writer (see ``StreamingSavePlanner``). So a process
holds a few stripes (about 32 MiB by default) and the boxes being written, and under ``torchrun``
the tensors are spread over the processes by size (``_my_share``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader

from dcp_hf.errors import CheckpointFormatError
from dcp_hf.format import TensorSpec
from dcp_hf.layouts import Layout, mem_view
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.storage import HFStorageReader
from dcp_hf.tensor_box import TensorBox


@dataclass(eq=False)
class _Stripe:
    """Rows [lo, hi) of a local source chunk, read whole (long contiguous reads) and shared by
    the boxes that lie in it, e.g. the gate and up halves of an expert's rows of a merged
    tensor. A stripe of several boxes, of at most ``stripe_bytes``, is read into a reused buffer
    (``pooled``), so its boxes are copied out of it; a larger one, or one that is a single box,
    is read into memory of its own (a single box is then written as it was read)."""

    source: MetadataIndex
    lo: int
    hi: int
    nbytes: int
    uses: int  # boxes not yet copied out
    pooled: bool
    state: str = "new"  # new -> reading -> read
    tensor: torch.Tensor | None = None
    error: BaseException | None = None


class _StripeReader:
    """Reads ``stripes`` (in the order the writer asks for them) on one thread, ahead of the
    writer, so that reading overlaps the writer's copies and writes, while the stripes held (read
    or being read, with boxes not yet copied out) stay within ``budget`` bytes. Pooled stripes
    go into a few reused buffers of ``buffer_bytes`` (no page faults, no allocator growth). A
    stripe the writer asks for before the thread has read it is read by the writer's thread,
    whatever the budget (a stripe larger than the budget is read only then)."""

    def __init__(self, stripes: list[_Stripe], read, budget: int, buffer_bytes: int):
        self.stripes, self.read, self.budget, self.buffer_bytes = stripes, read, budget, buffer_bytes
        self.held = 0  # bytes
        self.free: list = []  # storages of buffer_bytes
        self.closed = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def take(self, stripe: _Stripe) -> torch.Tensor:
        """The stripe's tensor, to copy a box out of; ``release`` the stripe after the copy."""
        with self.cond:
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._read_ahead, name="dcp-hf-stripe", daemon=True)
                self.thread.start()
            mine = stripe.state == "new"
            if mine:
                stripe.state, self.held = "reading", self.held + stripe.nbytes
        if mine:
            self._load(stripe)
        with self.cond:
            self.cond.wait_for(lambda: stripe.state == "read")
            if stripe.error is not None:
                raise stripe.error
            return stripe.tensor

    def release(self, stripe: _Stripe) -> None:
        with self.cond:
            stripe.uses -= 1
            if stripe.uses == 0:
                if stripe.pooled:
                    self.free.append(stripe.tensor.untyped_storage())
                stripe.tensor, self.held = None, self.held - stripe.nbytes
                self.cond.notify_all()

    def _read_ahead(self) -> None:
        for stripe in self.stripes:
            with self.cond:
                self.cond.wait_for(
                    lambda stripe=stripe: (
                        self.closed or stripe.state != "new" or self.held + stripe.nbytes <= self.budget
                    )
                )
                if self.closed:
                    return
                if stripe.state != "new":
                    continue
                stripe.state, self.held = "reading", self.held + stripe.nbytes
            self._load(stripe)

    def _load(self, stripe: _Stripe) -> None:
        tensor, error = None, None
        try:
            buffer = None
            if stripe.pooled:
                with self.cond:
                    buffer = self.free.pop() if self.free else None
                if buffer is None:
                    buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8).untyped_storage()
            tensor = self.read(stripe, buffer)
        except Exception as e:  # raised in the writer threads that take the stripe
            error = e
        with self.cond:
            stripe.tensor, stripe.error, stripe.state = tensor, error, "read"
            if error is not None:
                self.held -= stripe.nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()


def _dense(view: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``view`` in contiguous memory (new memory if ``fresh``), for the writer to write as it
    is. A transposed 2-D box (an expert's gate, up or down matrix in a stripe) is copied row by
    row first, so that the transpose takes torch's blocked path for a transposed contiguous
    matrix: several times faster than the element-by-element copy of a strided one."""
    if view.is_contiguous():
        return view.clone() if fresh else view
    if view.dim() == 2 and view.stride(0) == 1:
        return view.T.contiguous().T.contiguous()
    return view.contiguous()


class StreamingSavePlanner(HFSavePlanner):
    """Save meta tensors whose data is read from ``source`` (through ``source_layout``) when
    the writer needs it.

    The write items are put in source order and their boxes grouped into stripes: runs of whole
    rows of a source chunk, of about ``stripe_bytes``, that the boxes inside them cover. A stripe
    is read in one request (long reads, instead of a short strided run per row of each box),
    ahead of the writer within ``stripes_ahead * stripe_bytes`` bytes, and each box is copied out
    of it in the writer's order (a transpose, when splitting experts). So a process holds
    about that many bytes of source data, plus the boxes being written. A stripe must hold at
    least one expert's rows to be read ahead; larger ones are read when first needed. Call
    ``close`` after the save."""

    def __init__(
        self,
        layout: Layout,
        source: StorageReader,
        source_layout: Layout,
        *,
        stripe_bytes: int = 16 << 20,
        stripes_ahead: int = 2,
    ):
        super().__init__(layout)
        self.source = source
        self.source_layout = source_layout
        self.stripe_bytes = stripe_bytes
        self.stripes_ahead = stripes_ahead
        self.source_metadata = source.read_metadata()
        source.set_up_storage_reader(self.source_metadata, True)
        self._stripe_of: dict[MetadataIndex, _Stripe] = {}  # write item -> the stripe its box lies in
        self._reader: _StripeReader | None = None

    def _chunk_shape(self, fqn: str) -> tuple[int, ...]:
        value = self.state_dict[fqn]
        return tuple(value.local.shape if isinstance(value, TensorBox) else value.shape)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)

        def position(item):
            piece = self._sources.get(item.index)
            if piece is None:
                return "", (), ()
            return piece.fqn, tuple(piece.chunk_offsets), tuple(piece.local_lo)

        items = sorted(plan.items, key=position)
        stripes = self._plan_stripes(items)
        self.close()
        self._reader = _StripeReader(
            list(dict.fromkeys(stripes.values())),
            self._read_stripe,
            self.stripes_ahead * self.stripe_bytes,
            self.stripe_bytes,
        )
        self._stripe_of = stripes
        return dataclasses.replace(plan, items=items)

    def _plan_stripes(self, items) -> dict[MetadataIndex, _Stripe]:
        """Consecutive boxes (in source order) grouped into stripes of about ``stripe_bytes`` (a
        box that shares rows with a stripe joins it whatever its size); the boxes of a group
        that does not cover its rows (a stripe would read bytes nobody asked for) are read alone."""
        stripes, group = {}, []  # group: (item index, source, lo, size) of the open stripe's boxes

        def end(boxes) -> int:
            return max(lo[0] + size[0] for _, _, lo, size in boxes)

        def close():
            if group:
                source, lo, hi = group[0][1], group[0][2][0], end(group)
                shape = self._chunk_shape(source.fqn)
                row = math.prod(shape[1:])
                if sum(math.prod(size) for *_, size in group) >= (hi - lo) * row:
                    nbytes = (hi - lo) * row * self.state_dict[source.fqn].dtype.itemsize
                    # a stripe that is one box is read into memory of its own and written as it
                    # is; one shared by boxes goes into a reused buffer they are copied out of
                    pooled = nbytes <= self.stripe_bytes and len(group) > 1
                    stripe = _Stripe(source, lo, hi, nbytes, len(group), pooled)
                    stripes.update((index, stripe) for index, *_ in group)
                group.clear()

        for item in items:
            if item.index not in self._sources:
                continue
            piece = self._sources[item.index]
            source, lo, size = piece.source, piece.local_lo, piece.local_size
            if not size or 0 in size:
                continue  # a scalar or an empty box: nothing to share
            box = (item.index, source, tuple(lo), tuple(size))
            if group:
                first, hi = group[0], end(group + [box])
                row_bytes = math.prod(self._chunk_shape(source.fqn)[1:]) * self.state_dict[source.fqn].dtype.itemsize
                if source != first[1] or (hi > end(group) and (hi - first[2][0]) * row_bytes > self.stripe_bytes):
                    close()
            group.append(box)
        close()
        return stripes

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:  # ``stream``'s objects: serialized already
            return self.lookup_object(write_item.index)
        stripe = self._stripe_of.get(write_item.index)
        if stripe is None:
            return _dense(super().resolve_data(write_item), fresh=False)
        piece = self._sources[write_item.index]
        mem_dims, lo, size = piece.mem_dims, piece.local_lo, piece.local_size
        tensor = self._reader.take(stripe)
        try:
            box = mem_view(tensor, (lo[0] - stripe.lo,) + tuple(lo[1:]), size, mem_dims)
            return _dense(box, fresh=stripe.pooled)  # a pooled stripe's buffer is read into again
        finally:
            self._reader.release(stripe)

    def _read_stripe(self, stripe: _Stripe, buffer) -> torch.Tensor:
        shape = self._chunk_shape(stripe.source.fqn)
        size = (stripe.hi - stripe.lo,) + shape[1:]
        dtype = self.state_dict[stripe.source.fqn].dtype
        out = None if buffer is None else torch.empty(0, dtype=dtype).set_(buffer, 0, size)
        return self.fetch(stripe.source, (stripe.lo,) + (0,) * (len(shape) - 1), size, out)

    def fetch(
        self, source: MetadataIndex, lo: tuple[int, ...], size: tuple[int, ...], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The box (lo, size) of the local chunk ``source``, read from the source checkpoint
        (into ``out`` if given)."""
        value = self.state_dict[source.fqn]  # a meta tensor or a TensorBox of one
        chunk_lo = tuple(source.offset) if source.offset is not None else (0,) * len(lo)
        out = torch.empty(size, dtype=value.dtype) if out is None else out
        box = TensorBox(out, [c + o for c, o in zip(chunk_lo, lo)], tuple(value.size()))
        planner = HFLoadPlanner(self.source_layout)
        planner.set_up_planner({source.fqn: box}, self.source_metadata, True)
        plan = planner.finish_plan(planner.create_local_plan())
        try:
            self.source.read_data(plan, planner).wait()
        except (EOFError, pickle.UnpicklingError) as e:  # DCP's own reader on a cut-short file
            where = getattr(self.source, "path", "the source checkpoint")
            raise CheckpointFormatError(f"{where}: {source.fqn!r}: its data ends early or is corrupt ({e})") from e
        return out

    def close(self) -> None:
        """Stop reading ahead (after the save, or when it failed)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def hf_specs(reader: HFStorageReader) -> dict[str, TensorSpec]:
    reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))
    return {k: TensorSpec(k, e.dtype, e.shape) for h in reader.headers.values() for k, e in h.tensors.items()}


def dcp_specs(reader: StorageReader) -> tuple[dict[str, TensorSpec], list[str]]:
    md = reader.read_metadata()
    specs, skipped = {}, []
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            specs[key] = TensorSpec(key, entry.properties.dtype, tuple(entry.size))
        else:
            skipped.append(key)
    return specs, skipped


def _my_share(specs: dict[str, TensorSpec]) -> dict:
    """This rank's share of the tensors, as meta tensors (shapes and dtypes only): a tensor
    larger than a rank's fair share is split by rows over all ranks (a TensorBox each), the
    rest are dealt out whole by size, largest first, to the least loaded rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    fair = sum(s.nbytes for s in specs.values()) / world
    load = [0] * world
    mine = {}
    for spec in sorted(specs.values(), key=lambda s: (-s.nbytes, s.key)):
        if world > 1 and spec.nbytes > fair / 2 and spec.shape and spec.shape[0] >= world:
            rows = spec.shape[0]
            lo, hi = rows * rank // world, rows * (rank + 1) // world
            for r in range(world):
                load[r] += spec.nbytes * ((rows * (r + 1) // world) - (rows * r // world)) // rows
            local = torch.empty((hi - lo, *spec.shape[1:]), dtype=spec.dtype, device="meta")
            mine[spec.key] = TensorBox(local, (lo,) + (0,) * (len(spec.shape) - 1), spec.shape)
            continue
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += spec.nbytes
        if r == rank:
            mine[spec.key] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    return mine


def stream(
    specs: dict[str, TensorSpec],
    source: StorageReader,
    source_layout: Layout,
    writer,
    dest_layout: Layout,
    stripe_bytes: int = 16 << 20,
    objects: dict | None = None,
) -> None:
    """Write ``specs`` (in-memory tensors) with ``writer`` through ``dest_layout``, reading each
    box from ``source`` through ``source_layout`` (see ``StreamingSavePlanner``). ``objects``:
    key -> ``io.BytesIO`` of bytes serialized already, written as they are (by the first
    process), as megatron-core's writer writes its sharded objects."""
    planner = StreamingSavePlanner(dest_layout, source, source_layout, stripe_bytes=stripe_bytes)
    share = _my_share(specs)
    if objects and is_main():
        share.update(objects)
    # an HFStorageReader keeps its files and threads across the reads of the stripes
    session = source.session() if hasattr(source, "session") else contextlib.nullcontext()
    try:
        with session:
            dcp.save(share, storage_writer=writer, planner=planner, no_dist=not dist.is_initialized())
    finally:
        planner.close()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
