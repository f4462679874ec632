"""HFLoadPlanner: DCP load planning in HF key space, through a layout, with up-front checks."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from typing import NamedTuple, cast

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list

from dcp_hf import training_state
from dcp_hf.boxes import overlap
from dcp_hf.contract import LoadSource
from dcp_hf.contract.keysets import decode_keys, encode_keys
from dcp_hf.errors import StateDictMismatchError
from dcp_hf.layouts import IDENTITY, Layout, Piece, mem_view
from dcp_hf.layouts.quantized import QuantizedTensor
from dcp_hf.tensor_box import BOXES, find_chunk


def _object_item(key: str, stored_key: str) -> ReadItem:
    """The read item of a value that is not a tensor (its bytes, whole)."""
    return ReadItem(
        type=LoadItemType.BYTE_IO,
        dest_index=MetadataIndex(key),
        dest_offsets=torch.Size([0]),
        storage_index=MetadataIndex(stored_key),
        storage_offsets=torch.Size([0]),
        lengths=torch.Size([0]),
    )


class _KeyFilter:
    """Keys matching any of some glob patterns; ``True`` matches every key."""

    def __init__(self, patterns: Iterable[str] | bool):
        self.everything = patterns is True
        self.patterns = [] if isinstance(patterns, bool) else list(patterns)

    def __call__(self, key: str) -> bool:
        return self.everything or any(fnmatch.fnmatchcase(key, p) for p in self.patterns)


def _memory_identity(value) -> tuple | None:
    """What makes two state-dict values the very same memory: a plain CPU/GPU tensor's storage
    and view; a DTensor's mesh, placements and local view (the same on every rank, as its mesh
    is shared). None for anything else (meta tensors, TensorBox, empty tensors)."""
    mesh = placements = None
    if hasattr(value, "to_local") and hasattr(value, "device_mesh"):
        mesh, placements, value = id(value.device_mesh), tuple(value.placements), value.to_local()
    if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.is_meta or value.numel() == 0:
        return None
    storage = value.untyped_storage()
    return (
        mesh,
        placements,
        value.device,
        storage.data_ptr(),
        storage.nbytes(),
        value.dtype,
        value.storage_offset(),
        tuple(value.size()),
        tuple(value.stride()),
    )


class _Missing(NamedTuple):
    """A stored key the state dict needs but the checkpoint lacks (``name``, as the error says
    it), and the in-memory key that needs it."""

    name: str
    key: str


class DestView(NamedTuple):
    """Where a read item's bytes land: the box (``offsets``, ``sizes``, in-memory dims) of its
    destination chunk, with ``mem_dims`` the in-memory dim of each HF dim (see ``mem_view``)."""

    mem_dims: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclasses.dataclass
class _Dequantization:
    """One box of a quantized HF tensor: its data and scale boxes are read into temporaries
    (``arrived``, filled as they arrive); then it is dequantized into the destination view."""

    tensor: QuantizedTensor
    hf_offsets: tuple[int, ...]
    hf_sizes: tuple[int, ...]
    dest_index: MetadataIndex
    view: DestView  # of the destination chunk
    arrived: list


class HFLoadPlanner(DefaultLoadPlanner):
    """The recommended load planner for :class:`HFStorageReader` (it works with any DCP reader).

    Each local chunk of each in-memory tensor (plain tensor, DTensor, ShardedTensor,
    :class:`~dcp_hf.TensorBox`) becomes read items in HF key space through the ``layout``; each
    is resolved to a view of the destination, so the bytes land in place. Before any byte is
    read it checks, on every rank, that every HF tensor the state dict needs is in the
    checkpoint with the expected shape and dtype (unless the reader allows dtype casts), and
    on the coordinator, for all ranks together, that every tensor of the checkpoint is loaded
    by some rank. HF tensors stored quantized (the layout's ``quantization``) load
    dequantized: a rank reads only the data and scale boxes its chunk covers.

    Args:
        layout: how in-memory keys map to HF tensors (identity by default).
        allow_missing: in-memory keys (glob patterns) that may be absent from the checkpoint;
            they are left as they are. ``True``: any.
        allow_unexpected: HF keys (glob patterns) the checkpoint may hold that no rank loads.
            ``True``: any (a partial load).
        model_prefix: load a training checkpoint (:mod:`dcp_hf.training_state`): keys starting
            with it are the model's (looked up without it), every other key, tensor or not, is
            training state. Without it the training state of a checkpoint is ignored.
    """

    def __init__(
        self,
        layout: Layout | None = None,
        *,
        allow_missing: Iterable[str] | bool = (),
        allow_unexpected: Iterable[str] | bool = (),
        model_prefix: str | None = None,
    ):
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, allow_partial_load=True)
        self.layout = layout or IDENTITY
        # Read items need no box arithmetic (quantized tensors are planned apart).
        self._identity = dataclasses.replace(self.layout, quantization=None) == IDENTITY
        self.allow_missing = _KeyFilter(allow_missing)
        self.allow_unexpected = _KeyFilter(allow_unexpected)
        self.model_prefix = model_prefix
        self._pieces: dict[str, list[Piece]] = {}
        self._views: dict[ReadItem, DestView] = {}
        self._quantized: dict[tuple[str, str], QuantizedTensor] = {}  # (key, hf_key) ->
        self._dequant: dict[ReadItem, tuple[_Dequantization, int]] = {}
        self._local_items: list[ReadItem] | None = None

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        # DCP's set-up replaces values it does not know with None: keep TensorBox values out.
        boxes = {k: v for k, v in state_dict.items() if isinstance(v, BOXES)}
        for k in boxes:
            del state_dict[k]
        try:
            super().set_up_planner(state_dict, metadata, is_coordinator)
        finally:
            state_dict.update(boxes)
        self.state_dict.update(boxes)
        self._pieces = {}
        for key, value in self.state_dict.items():
            if hasattr(value, "size") and callable(value.size):
                self._pieces[key] = training_state.pieces(self.layout, key, tuple(value.size()), self.model_prefix)
        prefetch = LoadSource.of(metadata).prefetch
        if prefetch is not None:
            keys = {p.hf_key for pieces in self._pieces.values() for p in pieces}
            if self.layout.quantization is not None:
                keys |= {k for key in list(keys) for k in self.layout.quantization.stored_keys(key)}
            prefetch(keys)

    @property
    def _stored(self) -> Mapping[str, TensorStorageMetadata | BytesStorageMetadata]:
        """What the checkpoint holds, by stored key."""
        if self.metadata is None:
            raise StateDictMismatchError("HFLoadPlanner: set up without the checkpoint's metadata")
        return self.metadata.state_dict_metadata

    def create_local_plan(self) -> LoadPlan:
        source = LoadSource.of(self.metadata)
        objects = self._check_against_checkpoint(source)
        items = objects + self._tensor_items()
        self._local_items = None
        if source.compact_plans:
            # With HFStorageReader the read items stay here (finish_plan): the coordinator only
            # needs which keys each rank loads, as a compact code, however many ranks there are.
            self._local_items = items
            return LoadPlan([], planner_data=encode_keys({i.storage_index.fqn for i in items}))
        return LoadPlan(items)

    def _check_against_checkpoint(self, source: LoadSource) -> list[ReadItem]:
        """Check, before anything is read, that the checkpoint holds every HF tensor (and, with
        ``model_prefix``, every training-state value) the state dict needs, in the expected shape
        and a dtype it may load from; find the tensors stored quantized. Returns the read items
        of the values that are not tensors."""
        stored = self._stored
        self._quantized = {}
        missing: list[_Missing] = []
        objects = []
        for key, value in self.state_dict.items():
            if key not in self._pieces and self.model_prefix is not None:
                stored_key = training_state.BYTES + key
                if stored_key in stored:
                    objects.append(_object_item(key, stored_key))
                elif not self.allow_missing(key):
                    missing.append(_Missing(f"{stored_key} (for {key})", key))
                continue
            if key not in self._pieces:
                if self.allow_missing(key):
                    continue
                raise StateDictMismatchError(
                    f"{source.checkpoint}: {key!r} is a {type(value).__name__}, not a tensor; an HF "
                    f"checkpoint holds tensors only (list it in allow_missing to leave it as it is)"
                )
            for piece in self._pieces[key]:
                if not self._check_piece(key, value, piece, stored, source) and not self.allow_missing(key):
                    name = piece.hf_key if piece.hf_key == key else f"{piece.hf_key} (for {key})"
                    missing.append(_Missing(name, key))
        self._refuse_missing(missing, stored, source.checkpoint)
        return objects

    def _check_piece(self, key: str, value, piece: Piece, stored, source: LoadSource) -> bool:
        """Whether the checkpoint holds ``piece`` of in-memory ``key`` (raising where it holds
        it in a shape or dtype that cannot load); a quantized piece is noted in ``_quantized``."""
        where = source.checkpoint
        quantization = self.layout.quantization
        q = quantization and quantization.find(piece.hf_key, stored, value.dtype, where)
        if q:
            if q.shape != piece.hf_shape:
                raise StateDictMismatchError(
                    f"{where}: {piece.hf_key!r} (stored as {q.data.key!r} + {q.scale.key!r}) "
                    f"has shape {list(q.shape)} but {list(piece.hf_shape)} in the state dict"
                    + ("" if piece.hf_key == key else f" (from {key!r})")
                )
            self._quantized[key, piece.hf_key] = q
            return True
        if piece.hf_key not in stored:
            return False
        md_t = stored[piece.hf_key]
        if not isinstance(md_t, TensorStorageMetadata):
            raise StateDictMismatchError(f"{where}: {piece.hf_key!r} is not a tensor in the checkpoint")
        if tuple(md_t.size) != piece.hf_shape:
            part = "" if piece.hf_key == key else f" (from {key!r} of shape {list(value.size())})"
            raise StateDictMismatchError(
                f"{where}: {piece.hf_key!r} has shape {list(md_t.size)} in the checkpoint but "
                f"{list(piece.hf_shape)} in the state dict{part}"
            )
        stored_dtype = md_t.properties.dtype
        if (
            stored_dtype != value.dtype
            and stored_dtype.itemsize == 1
            and stored_dtype.is_floating_point
            and piece.hf_key + "_scale_inv" in stored
        ):
            # A cast would drop the block scales: a silently wrong load.
            raise StateDictMismatchError(
                f"{where}: {piece.hf_key!r} is {stored_dtype} with block scales "
                f"{piece.hf_key + '_scale_inv'!r}; load it dequantized with a layout that knows "
                f"the quantization (detect_layout(path) reads config.json's quantization_config, "
                f"or Layout(quantization=BlockFP8()))"
            )
        if stored_dtype != value.dtype and not source.allow_dtype_cast:
            part = "" if piece.hf_key == key else f" (as part of {key!r})"
            raise StateDictMismatchError(
                f"{where}: {piece.hf_key!r} is {stored_dtype} in the checkpoint but "
                f"{value.dtype} in the state dict{part} (pass allow_dtype_cast=True to the reader)"
            )
        return True

    def _refuse_missing(self, missing: list[_Missing], stored, where: str) -> None:
        """Raise for the missing keys, but those tied to a loaded key (loading it fills them)."""
        tied = self._tied_to_loaded([m.key for m in missing if m.key in self._pieces], stored)
        missing = [m for m in missing if m.key not in tied]
        if not missing:
            return
        plain = not any(training_state.is_training_state(k) for k in stored)
        state_missing = any(training_state.is_training_state(m.name) for m in missing)
        hint = f"holds no training state (no {training_state.INDEX_NAME}); " if plain and state_missing else ""
        raise StateDictMismatchError(
            f"{where}: {hint}missing {len(missing)} key(s) the state "
            f"dict needs: {', '.join(repr(m.name) for m in missing[:10])}{' ...' if len(missing) > 10 else ''} "
            f"(pass allow_missing={sorted({m.key for m in missing})[:10]!r} to HFLoadPlanner to leave "
            f"them as they are)"
        )

    def _tensor_items(self) -> list[ReadItem]:
        """The read items of this rank's chunks, each resolved later to a view of its
        destination (``_views``) or, for a quantized tensor, to temporaries (``_dequant``)."""
        stored = self._stored
        items: list[ReadItem] = []
        self._views, self._dequant = {}, {}
        for key, pieces in self._pieces.items():
            value = self.state_dict[key]
            if hasattr(value, "device_mesh") and value.device_mesh.get_coordinate() is None:
                continue  # a DTensor on a submesh this rank is not part of
            for chunk in _create_chunk_list(value):
                c_off, c_size = tuple(chunk.offsets), tuple(chunk.sizes)
                for piece in pieces:
                    q = self._quantized.get((key, piece.hf_key))
                    if q is not None:
                        items += self._dequant_items(key, c_off, c_size, piece, q)
                    elif piece.hf_key in stored:  # a tensor: _check_piece checked it
                        md_t = cast(TensorStorageMetadata, stored[piece.hf_key])
                        items += self._read_items(key, c_off, c_size, piece, md_t)
        return items

    def _tied_to_loaded(self, missing_keys: list[str], stored) -> set[str]:
        """The missing keys whose tensor is the very memory of a key that is loaded (tied
        weights: ``lm_head.weight`` is ``model.embed_tokens.weight`` in a model's state dict,
        and the checkpoint holds one of them): loading the other fills them."""
        missing = set(missing_keys)
        if not missing:
            return set()
        loaded: dict[tuple, str] = {}
        for key, pieces in self._pieces.items():
            if key not in missing and all(p.hf_key in stored for p in pieces):
                memory = _memory_identity(self.state_dict[key])
                if memory is not None:
                    loaded.setdefault(memory, key)
        return {k for k in missing if (m := _memory_identity(self.state_dict[k])) is not None and m in loaded}

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        if not self.allow_unexpected.everything:
            loaded = {item.storage_index.fqn for plan in global_plan for item in plan.items}
            for code in {plan.planner_data for plan in global_plan if plan.planner_data is not None}:
                loaded.update(decode_keys(code))
            unexpected = [
                k
                for k in sorted(self._stored)
                if k not in loaded
                and not self.allow_unexpected(k)
                and (self.model_prefix is not None or not training_state.is_training_state(k))  # model-only load
            ]
            if unexpected:
                where = LoadSource.of(self.metadata).checkpoint
                raise StateDictMismatchError(
                    f"{where}: {len(unexpected)} tensor(s) of the checkpoint are loaded by no rank: "
                    f"{', '.join(repr(k) for k in unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}"
                    f" (pass allow_unexpected=[...patterns] or True to HFLoadPlanner for a partial load)"
                )
        return super().create_global_plan(global_plan)

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        if self._local_items is not None:
            return dataclasses.replace(central_plan, items=self._local_items)
        return super().finish_plan(central_plan)

    def _read_items(self, key, c_off, c_size, piece: Piece, md_t: TensorStorageMetadata) -> list[ReadItem]:
        if self._identity and piece.hf_key == key and len(md_t.chunks) == 1 and md_t.chunks[0].sizes == md_t.size:
            # The common case (an HF tensor is one chunk; the piece is the whole tensor): the
            # chunk is read from where it lies.
            if 0 in c_size and 0 not in md_t.size:  # an empty chunk of a non-empty tensor
                return []
            dims = tuple(range(len(c_off)))
            item = ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(key, c_off),
                dest_offsets=torch.Size([0] * len(c_off)),
                storage_index=MetadataIndex(key, md_t.chunks[0].offsets),
                storage_offsets=torch.Size(c_off),
                lengths=torch.Size(c_size),
            )
            self._views[item] = DestView(dims, (0,) * len(c_off), c_size)
            return [item]
        hit = piece.intersect(c_off, c_size)
        if hit is None:
            return []
        lo, size, hf_off, hf_size = hit
        items = []
        for sc in md_t.chunks:  # HF tensors are one chunk; native DCP tensors may be several
            ov = overlap(hf_off, hf_size, tuple(sc.offsets), tuple(sc.sizes))
            if ov is None:
                continue
            o_lo, o_size = ov
            mem_lo, mem_size = list(lo), list(size)
            for i, m in enumerate(piece.mem_dims):
                mem_lo[m] += o_lo[i] - hf_off[i]
                mem_size[m] = o_size[i]
            local_lo = tuple(a - b for a, b in zip(mem_lo, c_off))
            item = ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(key, c_off),
                dest_offsets=torch.Size(local_lo),
                storage_index=MetadataIndex(piece.hf_key, sc.offsets),
                storage_offsets=torch.Size(a - b for a, b in zip(o_lo, sc.offsets)),
                lengths=torch.Size(o_size),
            )
            self._views[item] = DestView(piece.mem_dims, local_lo, tuple(mem_size))
            items.append(item)
        return items

    def _dequant_items(self, key, c_off, c_size, piece: Piece, q: QuantizedTensor) -> list[ReadItem]:
        """Read items for the data and scale boxes behind this chunk's box of ``q``."""
        hit = piece.intersect(c_off, c_size)
        if hit is None or 0 in hit.mem_sizes:
            return []
        lo, size, hf_off, hf_size = hit
        local_lo = tuple(a - b for a, b in zip(lo, c_off))
        job = _Dequantization(
            q, hf_off, hf_size, MetadataIndex(key, c_off), DestView(piece.mem_dims, local_lo, size), [None, None]
        )
        items = []
        for slot, (part, (b_off, b_size)) in enumerate(zip(q.stored, q.boxes(hf_off, hf_size))):
            item = ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=job.dest_index,
                dest_offsets=torch.Size(local_lo),
                storage_index=MetadataIndex(part.key, (0,) * len(part.shape)),
                storage_offsets=torch.Size(b_off),
                lengths=torch.Size(b_size),
            )
            self._dequant[item] = (job, slot)
            items.append(item)
        return items

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        if read_item in self._dequant:  # a temporary in the stored dtype; see commit_tensor
            job, slot = self._dequant[read_item]
            return torch.empty(tuple(read_item.lengths), dtype=job.tensor.stored[slot].dtype)
        view = self._views[read_item]
        return mem_view(self.lookup_tensor(read_item.dest_index), view.offsets, view.sizes, view.mem_dims)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        if read_item not in self._dequant:
            return super().commit_tensor(read_item, tensor)
        job, slot = self._dequant.pop(read_item)
        job.arrived[slot] = tensor
        if all(p is not None for p in job.arrived):  # data and scales are both here
            view = job.view
            out = mem_view(self.lookup_tensor(job.dest_index), view.offsets, view.sizes, view.mem_dims)
            data, scale = job.arrived
            job.tensor.dequantize(data, scale, job.hf_offsets, job.hf_sizes, out)
            job.arrived = [None, None]

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return find_chunk(self.state_dict, index)
