"""megatron-core's distributed optimizer, saved beside the HF weights as training state
(:mod:`dcp_hf.training_state`), its moments under the parameters' HF names, and loaded into
any other TP/PP/DP layout; nothing is gathered.

Each data-parallel rank of the distributed optimizer holds a flat range of every parameter
(of its tensor-parallel shard, flattened): its fp32 main ``param``, ``exp_avg`` and
``exp_avg_sq``. That range is a few boxes of the parameter shard (partial rows, whole rows,
partial rows: :func:`dcp_hf.boxes.flat_range_boxes`), and the shard is a box of the global
tensor (its sharded key and offset from the model's ``sharded_state_dict``), so each rank
writes its own part of the optimizer state straight from the optimizer's memory, and a load
reads each rank's part straight into it. The boxes go under the in-memory key
``optimizer.state.<sharded key>.<name>``, which the training-state rule maps through the
model's layout as the parameter itself (fused QKV into q/k/v, ``linear_fc1`` into gate/up,
vocab rows clipped): the first moment of ``model.layers.0.self_attn.q_proj.weight`` is
``training_state/optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg``. The param
groups (learning rate, betas, weight decay, ``step``, ...) are ``optimizer.param_groups``.

Why not megatron-core's own model-space form: ``sharded_state_dict(metadata={
"distrib_optim_sharding_type": "fully_sharded_model_space"})`` builds ShardedTensors with
flattened ranges, which megatron-core 0.16 rejects (dist_checkpointing/mapping.py:133,
"ShardedTensor.flattened_range is not supported"); ``fully_reshardable`` gathers every shard
over the data-parallel group on save, and its load fails with torch's own Adam (no Apex/TE:
distrib_optimizer.py:2101 skips ``step``, :940 then asks for it: KeyError 'step'). This module
reads and writes the same tensors megatron-core's methods do (``_get_model_param_range_map``,
``_get_main_param_and_optimizer_states``), and loads the param groups with the optimizer's own
``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcp_hf.boxes import flat_range_boxes
from dcp_hf.errors import StateDictMismatchError
from dcp_hf.megatron.adapter import ShardedModel
from dcp_hf.tensor_box import TensorBox, TensorBoxes

STATE = "optimizer.state."
GROUPS = "optimizer.param_groups"  # the in-memory key of the param groups of all its optimizers
IDENTITY_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")  # megatron-core's group identity


def inner_optimizers(optimizer) -> list:
    """The distributed optimizers of a megatron-core optimizer (a ChainedOptimizer holds one
    per kind of parameter: dense, expert); anything else is refused."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    for inner in inners:
        if not isinstance(inner, DistributedOptimizer):
            raise TypeError(
                f"optimizer: {type(inner).__name__} is not supported; dcp_hf.megatron saves "
                f"megatron-core's DistributedOptimizer (OptimizerConfig(use_distributed_optimizer=True))"
            )
        if inner.grad_scaler is not None:
            raise TypeError("optimizer: an fp16 grad scaler's state is not saved yet (use bf16 or fp32)")
        if inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            raise TypeError("optimizer: the precision-aware optimizer (TE FusedAdam's own state) is not supported yet")
    return inners


@dataclass(frozen=True)
class _Location:
    """Where a sharded tensor of the model lies in its parameter: its elements are
    ``[start, start + numel)`` of the parameter flattened."""

    tensor: object  # megatron ShardedTensor
    start: int


def _locations(model) -> dict[int, list[_Location]]:
    """id(parameter) -> the model's sharded tensors over it (one, or a factory's parts such as
    gated ``linear_fc1``'s gate and up halves)."""
    sharded = ShardedModel.of(model)
    out: dict[int, list[_Location]] = {}
    built = set()
    for f in sharded.factories:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        param = f.factory.data
        for st in (v for v in nested_values(f.built) if isinstance(v, ShardedTensor)):
            built.add(id(st))
            part = st.data
            if (
                part.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()
                or not part.is_contiguous()
                or not param.is_contiguous()
            ):
                raise StateDictMismatchError(
                    f"{st.key!r}: its sharded tensor is not a contiguous part of the parameter (a copy); "
                    f"its optimizer state cannot be mapped"
                )
            out.setdefault(id(param), []).append(_Location(st, part.storage_offset() - param.storage_offset()))
    for st in sharded.tensors:
        if id(st) not in built:
            out.setdefault(id(st.data), []).append(_Location(st, 0))
    return out


def state_dict(optimizer, model, *, main_replicas_only: bool) -> dict:
    """This rank's part of the optimizer state as a DCP state dict: in-memory key ->
    TensorBoxes (views of the optimizer's own tensors), and the param groups under
    ``optimizer.param_groups``. ``main_replicas_only``: leave out the copies other
    tensor-parallel ranks also hold (parameters not split by TP), for a save."""
    locations = _locations(model)
    boxes: dict[str, list[TensorBox]] = {}
    for inner in inner_optimizers(optimizer):
        for param in inner.model_param_group_index_map:
            held = inner._get_model_param_range_map(param)["param"]  # this rank's flat range of it
            tensors = inner._get_main_param_and_optimizer_states(param)
            flat = {n: t for n, t in tensors.items() if t.dim() == 1 and t.numel() == held.end - held.start}
            if id(param) not in locations:
                raise StateDictMismatchError("a parameter of the optimizer is not in the model's sharded state dict")
            for where in locations[id(param)]:
                st = where.tensor
                if main_replicas_only and any(r != 0 for r in _replica(st)):
                    continue
                lo, hi = max(held.start, where.start), min(held.end, where.start + st.data.numel())
                done = lo
                for offsets, sizes in flat_range_boxes(tuple(st.data.shape), lo - where.start, hi - where.start):
                    n = int(torch.Size(sizes).numel())
                    lead = tuple(st.global_offset[: st.prepend_axis_num])
                    at = lead + tuple(o + g for o, g in zip(offsets, st.global_offset[st.prepend_axis_num :]))
                    for name, t in flat.items():
                        local = t[done - held.start : done - held.start + n].view((1,) * len(lead) + tuple(sizes))
                        boxes.setdefault(f"{STATE}{st.key}.{name}", []).append(TensorBox(local, at, st.global_shape))
                    done += n
    out: dict = {key: TensorBoxes(b) for key, b in boxes.items()}
    out[GROUPS] = param_groups(optimizer)
    return out


def _replica(st) -> tuple:
    """The (PP, TP) part of a sharded tensor's replica id: the data-parallel ranks each hold
    their own range of the optimizer state, so that part does not make a copy."""
    r = st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)
    return tuple(r[:2])


def param_groups(optimizer) -> list[dict]:
    """The param groups of all its optimizers as megatron-core's ``state_dict`` gives them
    (every field but ``params``; ``step``, which torch's own Adam keeps per parameter, from
    its state)."""
    groups = []
    for inner in inner_optimizers(optimizer):
        steps = {s["step"].item() for s in inner.optimizer.state.values() if "step" in s}
        if len(steps) > 1:
            raise StateDictMismatchError(f"optimizer: parameters at different steps {sorted(steps)}")
        step = steps.pop() if steps else None
        for group in inner.optimizer.param_groups:
            groups.append({"step": step, **{k: v for k, v in group.items() if k != "params"}})
    return groups


def load_param_groups(optimizer, groups: list[dict]) -> None:
    """Give each optimizer its loaded param groups (matched as megatron-core matches them, by
    their identity fields) through its own ``load_state_dict``, which also makes its state
    tensors where it has none yet."""
    for inner in inner_optimizers(optimizer):
        own = {tuple(g[k] for k in IDENTITY_KEYS) for g in inner.optimizer.param_groups}
        mine = [g for g in groups if tuple(g[k] for k in IDENTITY_KEYS) in own]
        if len({tuple(g[k] for k in IDENTITY_KEYS) for g in mine}) != len(own):
            raise StateDictMismatchError(
                f"optimizer: the checkpoint's param groups {[{k: g[k] for k in IDENTITY_KEYS} for g in groups]} "
                f"lack some of this optimizer's"
            )
        inner.load_state_dict({"optimizer": {"param_groups": mine}})
        for s in inner.optimizer.state.values():  # megatron-core gives every parameter one shared step tensor
            if "step" in s:
                s["step"] = s["step"].clone()
