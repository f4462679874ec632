"""Offline export of a Megatron ``torch_dist`` checkpoint (what ``megatron.core.dist_checkpointing``
writes: DCP files keyed by sharded keys) to an HF checkpoint, without building the model.

Each process writes a share of the HF tensors; each box is read from the Megatron files when
the writer needs it (see :mod:`dcp_hf.streaming`), so a process holds a few tensors at a time.
Run it in one process or under ``torchrun`` (more processes, more throughput).
"""

from __future__ import annotations

import fnmatch
import os

import torch.distributed.checkpoint as dcp

from dcp_hf.errors import CheckpointFormatError, Fix
from dcp_hf.layouts import IDENTITY
from dcp_hf.megatron import export_dtype, hf_tensors, layout_of
from dcp_hf.megatron.check import check_against_transformers
from dcp_hf.megatron.hf_config import check_given, checked_megatron_config
from dcp_hf.megatron.training_args import checkpoint_args, imported_config, settings_of_args
from dcp_hf.storage import HFStorageWriter
from dcp_hf.storage.hf_files import config_dict
from dcp_hf.streaming import dcp_specs, stream

NOT_MODEL = ("optimizer.*", "rng_state*", "*._extra_state*")  # training state, not weights


def with_family(config: dict, family: str | None = None) -> dict:
    """An HF config dict as ``export`` and ``import`` read it: ``family`` must be the config's
    ``model_type`` (it names it where the config does not)."""
    if family is not None:
        if config.get("model_type", family) != family:
            raise ValueError(f"--family {family} but the config says model_type {config['model_type']!r}")
        config = {**config, "model_type": family}
    return config


def export_torch_dist(
    src: str,
    dst: str,
    config: str | dict,
    *,
    family: str | None = None,
    exclude=(),
    dtype=None,
    max_shard_size="5GB",
    overwrite=False,
    progress=False,
    assume_config_matches=False,
) -> dict:
    """Export the model tensors of the ``torch_dist`` checkpoint ``src`` to an HF checkpoint in
    ``dst`` (folder or ``s3://``). ``config``: the model's HF config (dict, config.json, or an HF
    folder whose tokenizer and other side files are copied too); it gives the attention shape
    and the true vocab size, and its ``model_type`` the family (one of ``FAMILIES``).
    Optimizer and RNG state are skipped; any other key that the Megatron layout does not cover
    is an error unless it matches an ``exclude`` pattern. ``family``: must be the config's
    ``model_type`` (it names it where the config does not). Before writing, the tensors to write
    are compared with what transformers' model class of the config holds (names, shapes,
    dtypes): any difference is an error naming the keys.

    The config must describe the model that was trained: the training arguments Megatron-LM
    records in the checkpoint (``common.pt``'s ``args``) are checked against it as ``save_hf``
    checks a model (every setting that changes the math expressed, the rest refused). A
    checkpoint without them is refused unless ``assume_config_matches`` (the caller vouches
    that the config describes the training settings)."""
    folder = None
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            folder, path = path, os.path.join(path, "config.json")
        config = config_dict(path)
    config = with_family(config, family)
    fam, mconfig = check_export_config(config, src, assume_config_matches)
    reader = dcp.FileSystemReader(src)
    specs, skipped = dcp_specs(reader)
    mtp = {
        k.split(".")[2]
        for k in specs
        if k.startswith("mtp.layers.") and not any(fnmatch.fnmatchcase(k, p) for p in (*NOT_MODEL, *exclude))
    }
    layout = layout_of(mconfig, fam, config["vocab_size"], mtp_copies=len(mtp))
    rule = layout.rules[0]
    model, unknown = {}, []
    for key, spec in specs.items():
        if any(fnmatch.fnmatchcase(key, p) for p in (*NOT_MODEL, *exclude)):
            skipped.append(key)
        elif rule.locate(key) is None:
            unknown.append(key)
        else:
            model[key] = spec
    if unknown:
        raise CheckpointFormatError(
            f"{src}: {len(unknown)} tensor(s) the Megatron layout does not cover: {sorted(unknown)[:10]}",
            fix=Fix("exclude", "pass exclude patterns to leave them out"),
        )
    written = hf_tensors(layout, {k: (s.shape, s.dtype) for k, s in model.items()}, export_dtype(dtype))
    check_against_transformers(config, written, f"export of {src}")
    # config.json and the folder's tokenizer files are committed with the weights, in one step
    writer = HFStorageWriter(
        dst,
        max_shard_size=max_shard_size,
        dtype=export_dtype(dtype),
        overwrite=overwrite,
        progress=progress,
        config=config,
        copy_from=folder,
    )
    stream(model, reader, IDENTITY, writer, layout)
    return {"tensors_in": len(model), "skipped": len(skipped), "copied": sorted(writer.side_files)}


def check_export_config(config: dict, src: str, assume_config_matches: bool = False):
    """The family and TransformerConfig of an export of ``src`` with the HF ``config``, refused
    unless the config is exact: of a family dcp-hf maps, and describing the model the
    checkpoint's training arguments build (or, without them, ``assume_config_matches``)."""
    try:
        fam, mconfig, _ = checked_megatron_config(config)
    except ValueError as e:
        raise ValueError(f"export of {src}: {e}; nothing written") from None
    args = checkpoint_args(src)
    if args is None:
        # a checkpoint dcp-hf imported from this very config is the model the config describes
        if not assume_config_matches and imported_config(src) != config:
            raise ValueError(
                f"{src}: the checkpoint records no training arguments (common.pt has no 'args', as "
                f"Megatron-LM writes them), so nothing shows that the model was trained with the settings "
                f"the config.json states (activation, normalization, RoPE, attention windows, softmax...); "
                f"pass --assume-config-matches (assume_config_matches=True) to vouch that it was; nothing written"
            )
        return fam, mconfig
    where = f"{src}/common.pt"
    try:
        check_given(config, settings_of_args(args, where), fam)
    except ValueError as e:
        raise ValueError(f"{where}: the training arguments: {e}; nothing written") from None
    return fam, mconfig
