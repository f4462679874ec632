"""Rank functions for the import tests (spawned processes import them from here): import an HF
checkpoint as a Megatron ``torch_dist`` checkpoint, then, with megatron-core's own loader as
the oracle, load it into GPTModels at several layouts and compare with what ``load_hf`` puts
into the same models from the HF folder."""

from __future__ import annotations

import json
import os

import torch

from testkit.megatron_oracle import load_torch_dist  # noqa: F401 (rank functions use it)
from tests.megatron_workers import dump_params


def differences(a, b) -> list[str]:
    """Parameters and buffers of two models' chunks that are not bit-for-bit equal."""
    bad = []
    for ca, cb in zip(a, b):
        ta = {**dict(ca.named_parameters()), **dict(ca.named_buffers())}
        tb = {**dict(cb.named_parameters()), **dict(cb.named_buffers())}
        if sorted(ta) != sorted(tb):
            bad.append(f"names differ: {sorted(set(ta) ^ set(tb))[:5]}")
        bad += [k for k in ta if k in tb and (ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]))]
    return bad


def import_and_check(rank, world, jobs):
    """Each job (HF folder, checkpoint folder, output root, layouts): ``import_hf`` on every
    rank, then at each layout i: a model loaded by ``load_hf`` from the HF folder and another
    (other random weights) loaded by megatron-core from the import, compared bit for bit; the
    second's parameters dumped in ``root/dump{i}`` for the test's independent oracle.
    Returns {checkpoint: [differences at each layout]}."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import build_gpt, init_parallel
    from dcp_hf.megatron.import_hf import import_hf

    out = {}
    for src, ckpt, root, layouts in jobs:
        import_hf(src, ckpt)
        with open(os.path.join(src, "config.json")) as f:
            hf = json.load(f)
        mtp = bool(hf.get("num_nextn_predict_layers"))
        found = []
        for i, p in enumerate(layouts):
            init_parallel(p)
            want = build_gpt(hf, p, seed=1, mtp=mtp)
            dmeg.load_hf(want, src)
            got = build_gpt(hf, p, seed=2, mtp=mtp)
            load_torch_dist(got, os.path.join(ckpt, "iter_0000001"))
            found.append(differences(want, got))
            dump_params(got, os.path.join(root, f"dump{i}"), rank)
            dist.barrier()
        ps.destroy_model_parallel()  # import_hf runs outside a Megatron job
        out[ckpt] = found
    return out


def import_and_save(rank, world, src, ckpt, saved):
    """``import_hf`` of ``src``; then the model loaded from it saved by megatron-core's own
    ``dist_checkpointing.save`` (its default sharded form) to ``saved``, to compare the files."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from dcp_hf.megatron.build import Parallel, build_gpt, cuda_calls_on_cpu, init_parallel
    from dcp_hf.megatron.import_hf import import_hf

    import_hf(src, ckpt)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    init_parallel(Parallel())
    chunks = build_gpt(hf, Parallel(), mtp=bool(hf.get("num_nextn_predict_layers")))
    load_torch_dist(chunks, os.path.join(ckpt, "iter_0000001"))
    os.makedirs(saved)
    with cuda_calls_on_cpu():
        dist_checkpointing.save({"model": chunks[0].sharded_state_dict(metadata={})}, saved)
    ps.destroy_model_parallel()
