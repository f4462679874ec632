"""dcp-hf inside torchtitan's ``CheckpointManager`` (torchtitan 0.3), unchanged.

torchtitan saves and loads HF checkpoints through names it imported from torch:
``HuggingFaceStorageWriter`` and ``consolidate_safetensors_files_on_every_rank`` in
``torchtitan.components.checkpointer.dcp``, ``HuggingFaceStorageReader`` in its state dict
adapters. :func:`use_dcp_hf` puts dcp-hf's classes at those names. The writer accepts torch's
keywords; what is left is torch's consolidation step, which torchtitan runs after a save when
the base checkpoint has an index (``fqn_to_index_mapping``): it saves into ``STEP/sharded``
and then merges that folder's per-rank shard files into ``STEP``. dcp-hf's files are final
already, so :func:`consolidate_safetensors_files_on_every_rank` moves the finished checkpoint
from ``STEP/sharded`` to ``STEP`` instead, whole or absent (one exchange of the folder, as a
save's commit), and hands a folder of torch's own shard files to torch's function.
"""

from __future__ import annotations

import os
import uuid

from dcp_hf.errors import on_every_rank
from dcp_hf.format import INDEX_NAME
from dcp_hf.format.index import SINGLE_FILE_NAME
from dcp_hf.storage import commit


def holds_hf_checkpoint(folder: str) -> bool:
    """Whether ``folder`` holds a finished HF checkpoint (an index or one model file), not
    torch's per-rank shard files awaiting consolidation."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in (INDEX_NAME, SINGLE_FILE_NAME))


def move_checkpoint(src: str, dst: str) -> None:
    """Make the finished checkpoint folder ``src`` the folder ``dst`` (``dst``'s other files are
    kept, its old checkpoint replaced), with the commit of a save: ``src`` becomes the staging
    folder beside ``dst`` and is exchanged with it, so a kill at any instant leaves ``dst`` as
    it was or holding the whole checkpoint. ``src`` may lie inside ``dst``."""
    save_id = uuid.uuid4().hex[:12]
    lock = commit.acquire_lock(dst, save_id)
    try:
        commit.clean_leftovers(dst)
        # Marked first: a kill after the rename leaves a staging folder the next save removes.
        os.close(commit.create_file(os.path.join(src, commit.MARKER))[0])
        work = commit.sibling(dst, "new", save_id)
        commit.step("move checkpoint")
        os.rename(src, work)
        commit.commit(commit.Destination(os.path.realpath(dst), work), save_id)
    finally:
        commit.release_lock(lock, save_id)


def consolidate_safetensors_files_on_every_rank(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int],
    num_threads: int = 1,
    process_group=None,
) -> None:
    """torch's function of the same name, for a folder dcp-hf saved: the coordinator (rank 0
    of ``process_group``) moves the checkpoint from ``input_dir`` to ``output_dir``; every rank
    returns once it is there, or raises if it failed. Torch's shard files go to torch's own."""
    import torch.distributed as dist

    final = [holds_hf_checkpoint(input_dir)]
    if dist.is_initialized():  # the coordinator's view: it may move the folder before others look
        dist.broadcast_object_list(final, group=process_group, group_src=0)
    if not final[0]:
        from torch.distributed.checkpoint._consolidate_hf_safetensors import (
            consolidate_safetensors_files_on_every_rank as consolidate,
        )

        return consolidate(input_dir, output_dir, fqn_to_index_mapping, num_threads, process_group)
    coordinator = not dist.is_initialized() or dist.get_rank(process_group) == 0
    on_every_rank(lambda: move_checkpoint(input_dir, output_dir) if coordinator else None, process_group)


def use_dcp_hf() -> None:
    """Make torchtitan's checkpointing (``CheckpointManager``'s HF saves with or without a base
    index, and HF loads through its state dict adapters) use dcp-hf. Call once per process,
    before the checkpoint manager saves or loads."""
    import importlib

    from dcp_hf import HFStorageReader, HFStorageWriter

    checkpointer = importlib.import_module("torchtitan.components.checkpointer.dcp")
    checkpointer.HuggingFaceStorageWriter = HFStorageWriter
    checkpointer.consolidate_safetensors_files_on_every_rank = consolidate_safetensors_files_on_every_rank
    for name in (
        "torchtitan.protocols.state_dict_adapter",
        "torchtitan.models.deepseek_v3.state_dict_adapter",
        "torchtitan.models.gpt_oss.state_dict_adapter",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a model whose own dependencies are not installed (triton)
            continue
        module.HuggingFaceStorageReader = HFStorageReader
