"""Offline import of an HF checkpoint as a Megatron ``torch_dist`` checkpoint: what
megatron-core's ``dist_checkpointing.save`` writes for the model (its default sharded form:
parallelism-independent keys, layers and experts stacked where megatron-core stacks them),
in the folder layout Megatron-LM's ``--load`` reads (``latest_checkpointed_iteration.txt``,
``iter_XXXXXXX/`` with ``metadata.json``, ``common.pt`` and the DCP files).

The mirror image of :mod:`dcp_hf.megatron.export`, with the same machinery: the family and
TransformerConfig come from config.json as ``export`` reads them; the keys, shapes and
objects to write come from the model built once on the meta device at TP1 (no memory, no
initialization); each Megatron chunk is read from the HF files through the Megatron layout
when the writer needs it (:func:`dcp_hf.streaming.stream`), so a process holds a few tensors,
and under ``torchrun`` the chunks are spread over the processes. The folder appears whole
or not at all.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcp_hf.convert import _whole_or_absent
from dcp_hf.errors import CheckpointFormatError, on_every_rank
from dcp_hf.format import TensorSpec
from dcp_hf.layouts import Layout, Piece
from dcp_hf.layouts.megatron import MegatronGPT
from dcp_hf.layouts.quantized import quantization_for_config
from dcp_hf.megatron import _checkpoint_config, layout_of
from dcp_hf.megatron.check import check_against_transformers
from dcp_hf.megatron.export import with_family
from dcp_hf.megatron.hf_config import checked_megatron_config
from dcp_hf.megatron.training_args import IMPORTED_CONFIG
from dcp_hf.progress import file_system_writer
from dcp_hf.storage import HFStorageReader
from dcp_hf.streaming import hf_specs, is_main, stream

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the latest iteration
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


@dataclass(frozen=True)
class Chunk:
    """One chunk of a Megatron tensor as ``dist_checkpointing.save`` writes it at TP1: the box
    at ``offsets`` (size ``sizes``; the stacked layer and expert axes of extent 1) of the tensor
    ``key`` of ``global_shape``."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """Its in-memory name while it streams (one name per chunk; never written)."""
        return f"{self.key}@{','.join(map(str, self.offsets))}"


@dataclass(frozen=True)
class Skeleton:
    """What the checkpoint holds: chunks by name, and megatron-core's sharded objects (the
    layers' ``_extra_state``) by their unique key, as the bytes its writer saves."""

    chunks: dict[str, Chunk]
    objects: dict[str, bytes]


@dataclass(frozen=True)
class ChunkSource:
    """Read a chunk (by its name) from HF tensors through the Megatron rule: the rule's pieces
    at the chunk's layer and expert, cut to the chunk's box and moved to its origin."""

    chunks: dict[str, Chunk]
    rule: MegatronGPT

    def pieces(self, key: str, shape: tuple[int, ...]) -> list[Piece] | None:
        chunk = self.chunks.get(key)
        if chunk is None:
            return None
        out = []
        for p in self.rule.pieces(chunk.key, chunk.global_shape, at=chunk.offsets) or ():
            hit = p.intersect(chunk.offsets, chunk.sizes)
            if hit is not None:
                lo, _, hf_off, hf_size = hit
                mem = tuple(a - b for a, b in zip(lo, chunk.offsets))
                out.append(Piece(p.hf_key, p.hf_shape, hf_size, hf_off, mem, p.mem_dims))
        return out

    def collect(self, specs):
        raise NotImplementedError("ChunkSource only reads")


@dataclass(frozen=True)
class ChunkTarget:
    """Write a chunk (by its name) as its box of the Megatron tensor."""

    chunks: dict[str, Chunk]

    def pieces(self, key: str, shape: tuple[int, ...]) -> list[Piece] | None:
        chunk = self.chunks.get(key)
        if chunk is None:
            return None
        n = len(chunk.sizes)
        return [Piece(chunk.key, chunk.global_shape, chunk.sizes, chunk.offsets, (0,) * n, tuple(range(n)))]

    def collect(self, specs):
        raise NotImplementedError("ChunkTarget only writes")


@contextlib.contextmanager
def _megatron_at_tp1():
    """Megatron's parallel state at TP1/PP1 over the processes (in one process, a process group
    of its own), for building the model on the meta device; torn down afterwards."""
    from megatron.core import parallel_state as ps

    from dcp_hf.megatron.build import Parallel, init_parallel

    if ps.model_parallel_is_initialized():
        raise RuntimeError(
            "import_hf builds the model on the meta device at TP1 and needs Megatron's parallel state "
            "for it: call it outside a Megatron job (its parallel state is initialized)"
        )
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init_parallel(Parallel())
        try:
            yield
        finally:
            ps.destroy_model_parallel()
    finally:
        if own:
            dist.destroy_process_group()


def skeleton(config: dict, dtype: torch.dtype) -> Skeleton:
    """The chunks and objects megatron-core's default sharded state dict has for the model of
    ``config`` with parameters of ``dtype`` (MTP layers included where the config has them),
    from the model built on the meta device."""
    from dcp_hf.megatron.adapter import ShardedModel
    from dcp_hf.megatron.build import Parallel, build_gpt

    with _megatron_at_tp1():
        chunks = build_gpt(
            config, Parallel(), params_dtype=dtype, mtp=bool(config.get("num_nextn_predict_layers")), meta=True
        )
        sharded = ShardedModel.of(chunks, metadata={})
    out = {}
    for st in sharded.tensors:
        sizes = (1,) * st.prepend_axis_num + tuple(st.data.shape)
        chunk = Chunk(st.key, tuple(st.global_shape), tuple(st.global_offset), sizes, st.data.dtype)
        out.setdefault(chunk.name, chunk)  # a tied embedding is reached twice
    objects = {}
    for obj in sharded.objects:  # serialized as megatron-core's torch_dist writer does
        buffer = io.BytesIO()
        torch.save([obj.data], buffer)
        objects[obj.unique_key] = buffer.getvalue()
    return Skeleton(out, objects)


def _default_dtype(config: dict, source: dict[str, TensorSpec]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if name:
        return getattr(torch, str(name).removeprefix("torch."))
    floating = [s.dtype for s in source.values() if s.dtype.is_floating_point]
    return floating[0] if floating else torch.float32


@dataclass
class _Plan:
    """What ``import_hf`` writes, after every check that can refuse it."""

    reader: HFStorageReader
    skeleton: Skeleton
    source_layout: Layout
    dest_layout: Layout
    config: dict


def _plan(src: str, dst: str, family: str | None, dtype, storage_options) -> _Plan:
    if os.path.lexists(dst):  # an old checkpoint's files would stay beside the new ones
        raise FileExistsError(f"{dst}: exists; import writes a new Megatron checkpoint folder")
    config = _checkpoint_config(src, storage_options)
    if config is None:
        raise CheckpointFormatError(f"{src}: no config.json; import needs the model's HF config")
    config = with_family(config, family)
    try:  # a family dcp-hf maps, whose Megatron model computes what transformers computes
        fam, mconfig, _ = checked_megatron_config(config)
    except ValueError as e:
        raise ValueError(f"import of {src}: {e}; nothing written") from None
    reader = HFStorageReader(src, allow_dtype_cast=True, storage_options=storage_options)
    source = hf_specs(reader)
    quantization = quantization_for_config(config)
    if quantization is not None:  # FP8 / MXFP4: read dequantized, to the model's dtype
        logical = Layout((), quantization=quantization).memory_specs(source)[0]
    else:
        logical = source
    check_against_transformers(config, {k: (s.shape, s.dtype) for k, s in logical.items()}, f"import of {src}")
    rule = layout_of(mconfig, fam, config["vocab_size"]).rules[0]
    found = skeleton(config, dtype or _default_dtype(config, logical))
    source_layout = Layout(
        (ChunkSource(found.chunks, rule),), strict=True, name="hf->megatron", quantization=quantization
    )
    _check_read(src, config, found, source_layout, logical)
    dest_layout = Layout((ChunkTarget(found.chunks),), strict=True, name="megatron-chunks")
    return _Plan(reader, found, source_layout, dest_layout, config)


def _check_read(src, config, found: Skeleton, layout: Layout, logical: dict[str, TensorSpec]) -> None:
    """Every HF tensor a chunk needs is in SRC with its shape, and every tensor of SRC is read
    (but the copies of the embedding and output layer in MTP layers: Megatron shares them)."""
    needed = {}
    for name, chunk in found.chunks.items():
        for piece in layout.pieces(name, chunk.sizes):
            needed[piece.hf_key] = piece.hf_shape
    missing = sorted(k for k in needed if k not in logical)
    shapes = [
        f"{k}: {list(logical[k].shape)} in SRC, {list(s)} needed"
        for k, s in needed.items()
        if k in logical and tuple(logical[k].shape) != tuple(s)
    ]
    layers = config["num_hidden_layers"]
    copies = {
        f"model.layers.{layers + n}.{name}"
        for n in range(config.get("num_nextn_predict_layers") or 0)
        for name in ("embed_tokens.weight", "shared_head.head.weight")
    }
    unread = sorted(k for k in logical if k not in needed and k not in copies)
    problems = [
        f"{len(keys)} tensor(s) {what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for what, keys in (
            ("missing", missing),
            ("of another shape", shapes),
            ("the Megatron model has no place for", unread),
        )
        if keys
    ]
    if problems:
        raise CheckpointFormatError(f"{src}: import to Megatron: nothing written; " + "; ".join(problems))


def import_hf(
    src: str,
    dst: str,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    iteration: int = 1,
    storage_options: dict | None = None,
    progress: bool = False,
    stripe_bytes: int = 16 << 20,
) -> dict:
    """Write the HF checkpoint ``src`` (folder or ``s3://`` URL, with its config.json) as the
    Megatron ``torch_dist`` checkpoint folder ``dst``: ``dst/latest_checkpointed_iteration.txt``
    and ``dst/iter_{iteration:07d}/`` (load it with Megatron-LM's ``--load dst --finetune``, or
    ``dist_checkpointing.load(model.sharded_state_dict(), dst/iter_...)``, at any TP/PP/EP).

    Call it on every process (one, or all of a ``torchrun`` job); outside a Megatron job.
    ``family``: must be config.json's ``model_type`` (names it where it does not). ``dtype``: the
    parameters' dtype (default: config.json's; megatron-core's fp32 tensors such as the expert
    bias stay fp32). Quantized releases (FP8 block-scaled, MXFP4) are read dequantized.
    ``iteration``: Megatron-LM reads an iteration above 0 (or ``release``). Before anything is
    written, on every process: the config must name a family and express a Megatron model,
    SRC's tensors must be what transformers' class of the config holds, and every one must be
    read (none dropped, none missing). ``dst`` must not exist; it appears whole or not at all."""
    if iteration < 1:
        raise ValueError(f"iteration {iteration}: Megatron-LM loads only iterations above 0")
    plan = on_every_rank(lambda: _plan(src, dst, family, dtype, storage_options))
    folder = f"iter_{iteration:07d}"
    specs = {n: TensorSpec(n, c.dtype, c.sizes) for n, c in plan.skeleton.chunks.items()}
    objects = {k: io.BytesIO(v) for k, v in plan.skeleton.objects.items()}

    def write(work: str) -> None:
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        out = os.path.join(work, folder)
        writer = file_system_writer(out, progress=progress)
        stream(specs, plan.reader, plan.source_layout, writer, plan.dest_layout, stripe_bytes, objects=objects)
        if is_main():  # what dist_checkpointing.save and Megatron-LM's save_checkpoint add
            save_config(CheckpointingConfig("torch_dist"), out)
            common = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, IMPORTED_CONFIG: plan.config}
            torch.save(common, os.path.join(out, "common.pt"))
            with open(os.path.join(work, TRACKER), "w") as f:
                f.write(f"{iteration}\n")

    _whole_or_absent(dst, write)
    return {"tensors": len({c.key for c in plan.skeleton.chunks.values()}), "chunks": len(specs), "iteration": folder}
