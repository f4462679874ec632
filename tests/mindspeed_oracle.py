"""The test oracle for ``dcp-hf experts``: what MindSpeed-MM's ``mm-convert moe_expert --style
merge|split`` (checkpoint/vlm_model/converters/moe_expert.py, for InternVL3.5, Qwen3-Omni and
GLM-4.5V) writes, restated step by step from its code path with plain torch on full tensors.
Nothing here uses dcp_hf: the model comes from ``transformers.AutoConfig``'s class, the tensors
from every ``*.safetensors`` file of the folder, as in MindSpeed-MM."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig


def _model(hf_dir: Path):
    """(is Qwen3-Omni, num_experts, num_hidden_layers, per-expert weight path, first MoE layer),
    read the way MindSpeed-MM reads them."""
    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
    name = config.__class__.__name__
    if name == "InternVLChatConfig":
        return (
            False,
            config.llm_config.num_experts,
            config.llm_config.num_hidden_layers,
            "language_model.model.layers.{layer}.mlp.experts.{expert}",
            0,
        )
    if name == "Qwen3OmniMoeConfig":
        text = config.thinker_config.text_config
        return True, text.num_experts, text.num_hidden_layers, "thinker.model.layers.{layer}.mlp.experts.{expert}", 0
    if name == "Glm4vMoeConfig":
        text = config.text_config
        return (
            False,
            text.n_routed_experts,
            text.num_hidden_layers,
            "model.language_model.layers.{layer}.mlp.experts.{expert}",
            text.first_k_dense_replace,
        )
    raise ValueError(f"Not supported model config: {name}")


def _load(hf_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in Path(hf_dir).glob("*.safetensors"):
        state.update(load_file(str(file), device="cpu"))
    return state


def copied_files(hf_dir: Path) -> set[str]:
    """The files MindSpeed-MM copies first: everything under the folder whose suffix is not
    ``.safetensors``, subfolders included (relative paths)."""
    return {str(p.relative_to(hf_dir)) for p in Path(hf_dir).rglob("*") if p.is_file() and p.suffix != ".safetensors"}


def merge(hf_dir: Path) -> dict[str, torch.Tensor]:
    omni, num_experts, num_layers, weight_path, start = _model(hf_dir)
    state = _load(hf_dir)
    merged_path = weight_path.replace(".{expert}", "")
    for layer in range(start, num_layers):
        gate_ups, downs = [], []
        for expert in range(num_experts):
            gate = state.pop((weight_path + ".gate_proj.weight").format(layer=layer, expert=expert))
            up = state.pop((weight_path + ".up_proj.weight").format(layer=layer, expert=expert))
            down = state.pop((weight_path + ".down_proj.weight").format(layer=layer, expert=expert))
            gate_ups.append(torch.concat([gate, up]).T)
            downs.append(down.T)
        gate_up, down = torch.stack(gate_ups), torch.stack(downs)
        if not omni:
            gate_up = gate_up.view(-1, gate_up.shape[-1])
            down = down.view(-1, down.shape[-1])
        state[(merged_path + ".gate_up_proj").format(layer=layer)] = gate_up
        state[(merged_path + ".down_proj").format(layer=layer)] = down
    if omni:
        for name in list(state):
            state[name.removeprefix("thinker.")] = state.pop(name)
    return {k: v.contiguous() for k, v in state.items()}


def split(merged_dir: Path) -> dict[str, torch.Tensor]:
    omni, num_experts, num_layers, weight_path, start = _model(merged_dir)
    state = _load(merged_dir)
    if omni:
        for name in list(state):
            state[f"thinker.{name}"] = state.pop(name)
    merged_path = weight_path.replace(".{expert}", "")
    for layer in range(start, num_layers):
        gate_up = state.pop((merged_path + ".gate_up_proj").format(layer=layer))
        down = state.pop((merged_path + ".down_proj").format(layer=layer))
        if not omni:
            gate_up = gate_up.view(num_experts, -1, gate_up.shape[-1])
            down = down.view(num_experts, -1, down.shape[-1])
        for expert, (gu, dn) in enumerate(zip(gate_up.unbind(), down.unbind())):
            gate, up = torch.chunk(gu.T, 2)
            state[(weight_path + ".gate_proj.weight").format(layer=layer, expert=expert)] = gate
            state[(weight_path + ".up_proj.weight").format(layer=layer, expert=expert)] = up
            state[(weight_path + ".down_proj.weight").format(layer=layer, expert=expert)] = dn.T
    return {k: v.contiguous() for k, v in state.items()}


def merge_to_dcp(hf_dir: Path, dcp_prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The state MindSpeed-MM's ``ExpertMergeDcpConverter.hf_to_dcp`` saves (hf_prefix ""): the
    merged checkpoint's keys, each with ``dcp_prefix`` before it."""
    return {f"{dcp_prefix}{k}": v for k, v in merge(hf_dir).items()}
