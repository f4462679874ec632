"""A Megatron model's sharded state dict as DCP state-dict values (TensorBox per shard).

``model.sharded_state_dict(metadata={"singleton_local_shards": True})`` describes every local
shard with its global key, shape and offset, and which copy is the main replica. Each becomes
a :class:`~dcp_hf.TensorBox` over the shard's own memory (no copy): DCP plans the save and the
load over them, and the Megatron layout turns their keys into HF tensors. Factories (gated
``linear_fc1``, grouped experts) are built first; where Megatron's build copied the data
(legacy grouped experts are stored transposed), the loaded copy is merged back afterwards
with Megatron's own merge function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dcp_hf.errors import StateDictMismatchError
from dcp_hf.tensor_box import TensorBox

SINGLETON = {"singleton_local_shards": True}


def model_chunks(model) -> list:
    """A model or its list of virtual-pipeline chunks, unwrapped (DDP, Float16Module) down to
    the GPT model itself."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        while not hasattr(chunk, "decoder") and isinstance(getattr(chunk, "module", None), torch.nn.Module):
            chunk = chunk.module
        out.append(chunk)
    return out


@dataclass
class Factory:
    """A factory and the sharded tensors it built; ``copied``: their data is not a view of
    the parameter, so a load must merge them back."""

    factory: object
    built: object

    def copied(self, tensors) -> bool:
        storage = self.factory.data.untyped_storage().data_ptr()
        return any(t.data.untyped_storage().data_ptr() != storage for t in tensors)


@dataclass
class ShardedModel:
    """The sharded tensors of every chunk of a model, and the factories that built some."""

    tensors: list  # megatron ShardedTensor
    factories: list[Factory]
    objects: list = field(default_factory=list)  # megatron ShardedObject (e.g. ``_extra_state``)

    @classmethod
    def of(cls, model, metadata: dict | None = None) -> "ShardedModel":
        """``metadata``: megatron-core's sharded-state-dict metadata; default: one key per
        layer and expert (``singleton_local_shards``), {} for its default form (the form of
        ``torch_dist`` checkpoints: layers and experts stacked where they are alike)."""
        return cls.collect(
            [
                chunk.sharded_state_dict(metadata=dict(SINGLETON if metadata is None else metadata))
                for chunk in model_chunks(model)
            ]
        )

    @classmethod
    def collect(cls, sharded_state_dict) -> "ShardedModel":
        """The sharded tensors, factories and objects of a (nested) Megatron sharded state dict:
        a model's, or an optimizer's (its state in model space, keyed like the parameters)."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

        tensors, factories, objects = [], [], []
        for value in nested_values(sharded_state_dict):
            if isinstance(value, ShardedTensorFactory):
                built = value.build()
                factories.append(Factory(value, built))
                tensors += [v for v in nested_values(built) if isinstance(v, ShardedTensor)]
            elif isinstance(value, ShardedTensor):
                tensors.append(value)
            elif isinstance(value, ShardedObject):
                objects.append(value)
        return cls(tensors, factories, objects)

    def state_dict(self, main_replicas_only: bool) -> dict[str, TensorBox]:
        """DCP state dict: sharded key -> TensorBox over the shard's memory."""
        from megatron.core.dist_checkpointing.mapping import is_main_replica

        out: dict[str, TensorBox] = {}
        for st in self.tensors:
            if main_replicas_only and not is_main_replica(st.replica_id):
                continue
            if st.flattened_range is not None:
                raise StateDictMismatchError(
                    f"{st.key!r}: a flattened shard (distributed optimizer state); save the "
                    f"model's parameters, not the optimizer's"
                )
            local = st.data.detach()
            local = local.reshape((1,) * st.prepend_axis_num + tuple(local.shape))
            box = TensorBox(local, st.global_offset, st.global_shape)
            seen = out.get(st.key)
            if seen is not None:
                if not _same_memory(seen, box):
                    raise StateDictMismatchError(
                        f"{st.key!r}: two different shards under one key on this rank ({seen} and "
                        f"{box}); the model's sharded_state_dict gives them the same key"
                    )
                continue  # one shard reached twice (tied embedding and output layer)
            out[st.key] = box
        return out

    def merge_loaded(self) -> None:
        """After a load: write back what factories had copied (Megatron's merge function)."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
        from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor

        def plain(x):
            if isinstance(x, ShardedTensor):
                return x.data
            return x.unwrap() if isinstance(x, LocalNonpersistentObject) else x

        for f in self.factories:
            tensors = [v for v in nested_values(f.built) if isinstance(v, ShardedTensor)]
            if f.copied(tensors):
                merged = f.factory.merge_fn(dict_list_map_outplace(plain, f.built))
                with torch.no_grad():
                    f.factory.data.copy_(merged.reshape(f.factory.data.shape))


def _same_memory(a: TensorBox, b: TensorBox) -> bool:
    return (
        tuple(a.offsets) == tuple(b.offsets)
        and a.local.shape == b.local.shape
        and a.local.data_ptr() == b.local.data_ptr()
        and a.local.stride() == b.local.stride()
    )
