"""Rank functions driving torchtitan 0.3's own ``CheckpointManager`` with dcp-hf switched in
(``dcp_hf.torchtitan.use_dcp_hf``): a tiny transformers Llama under FSDP2, torchtitan's
optimizer and LR scheduler containers, and a state dict adapter on torchtitan's own
``StateDictAdapter`` base (which reads the base checkpoint's index into
``fqn_to_index_mapping`` as for every real model). transformers' key names are HF's, so
the adapter's mapping is the identity."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from tests.training_workers import CONFIG, shard


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(CONFIG)


def sharded_llama(seed: int) -> LlamaForCausalLM:
    return shard(tiny_llama(seed))


def full_state(model) -> dict:
    """Every parameter gathered whole (the test's tiny model only), as numpy arrays (tensors
    would go back to the test through file descriptors of a process that has exited)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
        for k, v in model.state_dict().items()
    }


def _manager(model, base_folder: str, hf_assets_path: str):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from torchtitan.protocols.state_dict_adapter import StateDictAdapter

    class Adapter(StateDictAdapter):
        def to_hf(self, state_dict):
            return dict(state_dict)

        def from_hf(self, hf_state_dict):
            return dict(hf_state_dict)

    optimizers = OptimizersContainer(
        OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})],
            implementation="for-loop",
        ),
        model_parts=[model],
    )
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0 / (1 + step))
    config = CheckpointManager.Config(
        enable=True,
        folder="checkpoint",
        interval=1000,
        initial_load_in_hf=True,
        initial_load_model_only=True,
        last_save_in_hf=True,
        last_save_model_only=True,
        keep_latest_k=0,
    )
    manager = CheckpointManager(
        config,
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={},
        sd_adapter=Adapter(None, hf_assets_path),
        base_folder=base_folder,
    )
    return manager, optimizers, schedulers


def titan_load_train_save(rank, world, base_folder, hf_assets_path, switch):
    """torchtitan's flow: an initial HF load from ``hf_assets_path``, one training step, the
    last-step save in HF. Returns the loaded and the saved weights (gathered) and whether the
    adapter had the base index's file map."""
    if switch:
        from dcp_hf.torchtitan import use_dcp_hf

        use_dcp_hf()
    model = sharded_llama(seed=99)  # not the base weights: the load must bring them
    manager, optimizers, schedulers = _manager(model, base_folder, hf_assets_path)
    assert manager.load(), "torchtitan found nothing to load"
    loaded = full_state(model)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizers.step()
    schedulers.step()
    manager.save(curr_step=1, last_step=True)
    saved = full_state(model)
    manager.close()
    return loaded, saved, manager.sd_adapter.fqn_to_index_mapping is not None
