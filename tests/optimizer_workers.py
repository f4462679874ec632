"""Rank functions for the Megatron optimizer tests: a tiny GPT model with megatron-core's
distributed optimizer on gloo ranks takes Adam steps (gradients set by hand: megatron-core's
forward needs CUDA), is saved with ``save_hf(..., optimizer=)`` and with megatron-core's own
``dist_checkpointing.save``, and is resumed in another layout both ways.

The oracles: each rank's own optimizer shards read straight from the optimizer (its flat range
of each parameter), gathered and converted to HF names by the tests' independent statement of
the mapping (``megatron_workers.naive_hf``); and the run that was never stopped."""

from __future__ import annotations

import os

import torch

from tests.megatron_workers import Oracle, naive_hf, plain_params

STATES = ("param", "exp_avg", "exp_avg_sq")


def build_trained(hf: dict, layout, seed: int, steps: int):
    """This rank's model (DDP-wrapped chunks) and distributed optimizer after ``steps`` Adam
    steps on deterministic gradients (the same for the same parameter at any layout)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dcp_hf.megatron.build import build_gpt, cuda_calls_on_cpu, optimizer_on_cpu

    chunks = build_gpt(hf, layout, seed=seed)
    with cuda_calls_on_cpu(), optimizer_on_cpu():
        ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
        model = [DistributedDataParallel(c.config, ddp, c) for c in chunks]
        # No clipping: a global grad norm would sum in another order at another layout.
        config = OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.0, use_distributed_optimizer=True
        )
        optimizer = get_megatron_optimizer(config, model)
        for step in range(steps):
            take_step(model, optimizer, step)
    return model, optimizer


def take_step(model, optimizer, step: int) -> None:
    """One Adam step with gradients made from the values of the parameters (so they are the
    same at every layout for the same weights)."""
    from dcp_hf.megatron.build import cuda_calls_on_cpu, optimizer_on_cpu

    with cuda_calls_on_cpu(), optimizer_on_cpu():
        for chunk in model:
            for p in chunk.module.parameters():
                p.main_grad.copy_(torch.sin(p.detach() * (step + 3)) * 0.05 + 0.01)
        ok, _, _ = optimizer.step()
    assert ok


def dump_optimizer(model, optimizer, folder: str, rank: int) -> None:
    """This rank's flat range of every parameter's optimizer state, read from the optimizer."""
    os.makedirs(folder, exist_ok=True)
    chunks = [m.module for m in model]
    params = {(p.data_ptr(), tuple(p.shape)): p for c in chunks for p in c.parameters()}
    inner = optimizer.chained_optimizers[0]
    out = {}
    for name, info in plain_params(chunks).items():
        param = params[info["data"].data_ptr(), tuple(info["data"].shape)]
        if param not in inner.model_param_group_index_map:
            continue  # no part of it on this data-parallel rank
        tensors = inner._get_main_param_and_optimizer_states(param)
        out[name] = dict(
            states={k: tensors[k].detach().clone() for k in STATES},
            start=inner._get_model_param_range_map(param)["param"].start,
            shape=tuple(param.shape),
            dim=info["dim"],
            tp=info["tp"],
        )
    torch.save(out, f"{folder}/rank{rank}.pt")


def gathered_moments(folder: str) -> dict[str, dict[str, tuple[list[torch.Tensor], int | None]]]:
    """state name -> parameter name -> (its TP shards in rank order, TP dim): each TP shard
    put together from the data-parallel ranks' flat ranges."""
    ranges: dict[tuple[str, int], list] = {}
    dims = {}
    for file in sorted(os.listdir(folder)):
        for name, p in torch.load(os.path.join(folder, file)).items():
            if p["dim"] is None and p["tp"] != 0:
                continue  # not split by TP: tensor-parallel rank 0's copy
            ranges.setdefault((name, p["tp"]), []).append(p)
            dims[name] = p["dim"]
    out: dict[str, dict] = {s: {} for s in STATES}
    for (name, tp), parts in sorted(ranges.items()):
        parts.sort(key=lambda p: p["start"])
        for state in STATES:
            flat = torch.cat([p["states"][state] for p in parts])
            shard = flat.view(parts[0]["shape"])
            out[state].setdefault(name, ([], dims[name]))[0].append(shard)
    return out


def hf_moments(folder: str, oracle: Oracle) -> dict[str, dict[str, torch.Tensor]]:
    """state name -> HF tensor name -> the state, converted from the gathered shards by the
    tests' own statement of the mapping (``naive_hf``: q/k/v per query group, gate/up halves of
    each TP rank's ``linear_fc1``)."""
    out = {}
    for state, params in gathered_moments(folder).items():
        out[state] = {}
        for name, (parts, dim) in params.items():
            out[state].update(naive_hf(name, parts, dim, oracle))
    return out


def train_and_save(rank, world, hf, layout, out_root, steps):
    """Source job: ``steps`` steps at ``layout``, the optimizer's own shards dumped, saved with
    save_hf(optimizer=), then one more step (the uninterrupted run) dumped again."""
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import init_parallel

    init_parallel(layout)
    model, optimizer = build_trained(hf, layout, seed=1, steps=steps)
    dump_optimizer(model, optimizer, f"{out_root}/saved", rank)
    dmeg.save_hf(model, f"{out_root}/hf", family=hf["model_type"], optimizer=optimizer, max_shard_size="20KB")
    take_step(model, optimizer, steps)
    dump_optimizer(model, optimizer, f"{out_root}/uninterrupted", rank)
    return True


def resume(rank, world, hf, layout, out_root, steps, name):
    """Target job, at another layout: a model and optimizer with a state of their own (other
    weights, one step taken) load the checkpoint with load_hf(optimizer=); their state is
    dumped, then again after the step the uninterrupted run took."""
    from dcp_hf import megatron as dmeg
    from dcp_hf.megatron.build import init_parallel

    init_parallel(layout)
    model, optimizer = build_trained(hf, layout, seed=2, steps=1)
    dmeg.load_hf(model, f"{out_root}/hf", optimizer=optimizer)
    dump_optimizer(model, optimizer, f"{out_root}/{name}-loaded", rank)
    take_step(model, optimizer, steps)
    dump_optimizer(model, optimizer, f"{out_root}/{name}-resumed", rank)
    return [g["step"] for g in optimizer.chained_optimizers[0].state_dict()["optimizer"]["param_groups"]]
