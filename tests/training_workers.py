"""Rank functions of the training-checkpoint tests: a tiny transformers Llama under FSDP2 with
AdamW and a LambdaLR schedule, its whole training state saved in one ``dcp.save`` (HF model +
training state, :mod:`dcp_hf.training_state`) and resumed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def shard(model, mesh=None):
    """FSDP2 over ``mesh`` (default: all ranks), each decoder layer a unit, as trainers do."""
    mesh = mesh or init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build(seed: int, sharded: bool = True):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    if sharded:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1000 * step + rank))


def train_step(model, optimizer, scheduler, step: int, rank: int) -> float:
    tokens = batch(step, rank)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def training_state(model, optimizer, scheduler, step: int, rank: int) -> dict:
    """The state dict of a training checkpoint, in trainers' shape."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "lr_scheduler": scheduler.state_dict(),
        "dataloader": {f"rank{rank}": {"batches_seen": step}},  # each rank's own position
        "train_state": {"step": step},
    }


def restore(state: dict, model, optimizer, scheduler) -> int:
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    return state["train_state"]["step"]


def flat_full(state: dict, prefix: str = "") -> dict:
    """Every tensor of a nested state dict, gathered whole, as numpy (keys joined by '.')."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_full(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
    return out


def objects(state: dict) -> dict:
    """The values of the state dict that are not tensors (what trainers keep beside them)."""
    return {
        "lr_scheduler": {k: v for k, v in state["lr_scheduler"].items() if k != "lr_lambdas"},
        "param_groups": [{k: v for k, v in g.items()} for g in state["optimizer"]["param_groups"]],
        "train_state": state["train_state"],
    }


def train_save_continue(rank, world, path, k, n, use_async):
    """Train k steps, save the whole training state, go on to step n (the uninterrupted run)."""
    model, optimizer, scheduler = build(seed=0)
    losses = [train_step(model, optimizer, scheduler, s, rank) for s in range(k)]
    state = training_state(model, optimizer, scheduler, k, rank)
    saved, saved_objects = flat_full(state), objects(state)
    writer = HFStorageWriter(path, config=CONFIG, max_shard_size="40KB")
    planner = HFSavePlanner(model_prefix="model.")
    if use_async:
        dcp.async_save(state, storage_writer=writer, planner=planner).result()
    else:
        dcp.save(state, storage_writer=writer, planner=planner)
    losses += [train_step(model, optimizer, scheduler, s, rank) for s in range(k, n)]
    final = flat_full(training_state(model, optimizer, scheduler, n, rank))
    return {"losses": losses, "saved": saved, "saved_objects": saved_objects, "final": final}


def resume_train(rank, world, path, k, n):
    """A new job: fresh model and optimizer (another seed), the checkpoint loaded, on to step n."""
    model, optimizer, scheduler = build(seed=123)
    state = training_state(model, optimizer, scheduler, -1, rank)
    dcp.load(state, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(model_prefix="model."))
    step = restore(state, model, optimizer, scheduler)
    assert step == k and state["dataloader"] == {f"rank{rank}": {"batches_seen": k}}, (step, state["dataloader"])
    losses = [train_step(model, optimizer, scheduler, s, rank) for s in range(step, n)]
    return {"losses": losses, "final": flat_full(training_state(model, optimizer, scheduler, n, rank))}


def load_resharded(rank, world, path):
    """The checkpoint loaded into another sharding (FSDP2 over ``world`` ranks; one process:
    plain tensors); the training state as loaded (the dataloader positions are per rank of the
    saving job, not this one's: left out)."""
    model, optimizer, scheduler = build(seed=7, sharded=world > 1)
    state = training_state(model, optimizer, scheduler, -1, rank)
    del state["dataloader"]
    planner = HFLoadPlanner(model_prefix="model.", allow_unexpected=["training_state/bytes/dataloader.*"])
    dcp.load(state, storage_reader=HFStorageReader(path), planner=planner)
    return {"loaded": flat_full(state), "objects": objects(state)}


def build_2d(seed: int):
    """FSDP2 over a 2 x (world/2) mesh's first dim, tensor parallel over its second (columns of
    q/k/v/gate/up, rows of o/down): parameters are 2-D-mesh DTensors."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
    plan = {}
    for n in range(CONFIG.num_hidden_layers):
        p = f"model.layers.{n}."
        plan |= {p + f"self_attn.{x}_proj": ColwiseParallel() for x in "qkv"}
        plan |= {p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel()}
        plan |= {p + "self_attn.o_proj": RowwiseParallel(), p + "mlp.down_proj": RowwiseParallel()}
    shard(parallelize_module(model, mesh["tp"], plan), mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def load_2d(rank, world, path):
    """The checkpoint loaded into FSDP2 + TP on a 2-D mesh."""
    model, optimizer, scheduler = build_2d(seed=7)
    state = training_state(model, optimizer, scheduler, -1, rank)
    del state["dataloader"]
    two_d = [k for k, v in flat_tensors(state).items() if hasattr(v, "device_mesh") and v.device_mesh.ndim == 2]
    assert two_d, "no parameter is on the 2-D mesh"
    planner = HFLoadPlanner(model_prefix="model.", allow_unexpected=["training_state/bytes/dataloader.*"])
    dcp.load(state, storage_reader=HFStorageReader(path), planner=planner)
    return {"loaded": flat_full(state), "objects": objects(state), "two_d": len(two_d)}


def flat_tensors(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out
