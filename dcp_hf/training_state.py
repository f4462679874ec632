"""A training checkpoint in HF form: the model is the standard HF checkpoint, everything else
of the state dict (optimizer, LR scheduler, dataloader, step counters) lies beside it in the
same folder, committed with it.

The rule (``HFSavePlanner(model_prefix="model.")``, the same for ``HFLoadPlanner``): a key of
the (flattened) state dict that starts with ``model_prefix`` is a model tensor, stored under
the key without the prefix (then through the layout, as any model key); every other key is
training state, stored under ``training_state/`` + the key as it is. With a state dict such as
``{"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, opt), ...}``,
DCP's flattening names the first moment of ``model.layers.0.self_attn.q_proj.weight``
``optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg``: found by the HF name.

On storage: the training state's tensors go in ``training_state-0000K-of-0000N.safetensors``
(or ``training_state.safetensors``), grouped, laid out and written by the same machinery as the
weights (any placement, every byte once, no gather), indexed by
``training_state.safetensors.index.json``; values that are not tensors (DCP's ``BYTE_IO``
items: ints, floats, lists, param groups) are ``torch.save`` bytes stored as 1-D uint8
tensors under ``training_state/bytes/`` + the key. Names outside ``model.safetensors.index.json``
(which such a checkpoint always has, so readers that list ``*.safetensors`` keep to it), so
``from_pretrained``, vLLM and model-only loads see the model alone.
"""

from __future__ import annotations

import dataclasses
import io
import re
import zlib

import torch

from dcp_hf.errors import PeerRankError, StateDictMismatchError
from dcp_hf.layouts import Layout
from dcp_hf.layouts.core import Piece

PREFIX = "training_state/"  # the storage keys of the training state (no HF key has a "/")
BYTES = PREFIX + "bytes/"  # of its values that are not tensors
INDEX_NAME = "training_state.safetensors.index.json"
FILE_PATTERN = "training_state{suffix}.safetensors"
SINGLE_FILE_NAME = "training_state.safetensors"


def is_training_state(storage_key: str) -> bool:
    return storage_key.startswith(PREFIX)


# A parameter's optimizer state: ``optimizer.state.<parameter's model key>.<name>`` (torch's
# ``get_state_dict`` and torchtitan's optimizer state under ``"optimizer"``; dcp_hf.megatron's).
PARAM_STATE = re.compile(r"optimizer\.state\.(?P<param>.+)\.(?P<name>[^.]+)")


def pieces(layout: Layout, key: str, shape: tuple[int, ...], model_prefix: str | None) -> list[Piece]:
    """The stored pieces of in-memory tensor ``key``: a model key through the layout (without
    ``model_prefix``); a parameter's optimizer state (``optimizer.state.<param>.<name>``, shaped
    like the parameter) through the layout as that parameter, each piece under
    ``training_state/optimizer.state.<HF key>.<name>`` (a 0-dim state such as Adam's ``step``
    takes the layout's renames only); any other training-state key whole under
    ``training_state/``."""
    if model_prefix is None:
        return layout.pieces(key, shape)
    if key.startswith(model_prefix):
        return layout.pieces(key[len(model_prefix) :], shape)
    state = PARAM_STATE.fullmatch(key)
    if state is None:
        return [Piece.whole(PREFIX + key, tuple(shape))]
    param, name = state.group("param"), state.group("name")
    if not shape:
        return [Piece.whole(f"{PREFIX}optimizer.state.{layout.to_hf_key(param)}.{name}", ())]
    return [
        dataclasses.replace(p, hf_key=f"{PREFIX}optimizer.state.{p.hf_key}.{name}")
        for p in layout.pieces(param, tuple(shape))
    ]


def object_bytes(items, resolve, process_group=None) -> dict[str, torch.Tensor]:
    """This rank's share of the values that are not tensors: ``key -> uint8 tensor`` of their
    ``torch.save`` bytes (as DCP's own writer stores them). A key several ranks hold is written
    by the lowest of them; ranks holding different values under one key are an error naming it
    (DCP would keep one of them silently)."""
    import torch.distributed as dist

    mine, error = {}, None
    try:
        for item in items:
            buf = io.BytesIO()
            torch.save(resolve(item), buf)
            mine[item.index.fqn] = buf.getvalue()
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error = f"{type(e).__name__}: {e}"
    digests = {k: (len(v), zlib.crc32(v)) for k, v in mine.items()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        gathered = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, (error, digests), group=process_group)
        me = dist.get_rank(process_group)
    else:
        gathered, me = [(error, digests)], 0
    for rank, (err, _) in enumerate(gathered):
        if err is not None:
            raise PeerRankError(f"rank {rank} could not serialize a value of the training state: {err}")
    first: dict[str, tuple[int, tuple]] = {}
    for rank, (_, d) in enumerate(gathered):
        for key, digest in d.items():
            lowest, seen = first.setdefault(key, (rank, digest))
            if seen != digest:
                raise StateDictMismatchError(
                    f"{key!r}: ranks {lowest} and {rank} hold different values under this key; a value "
                    f"that is not a tensor is saved once, so give each rank's its own key"
                )
    return {
        key: torch.frombuffer(bytearray(data), dtype=torch.uint8) for key, data in mine.items() if first[key][0] == me
    }
