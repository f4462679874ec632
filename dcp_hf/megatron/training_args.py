"""The training arguments a Megatron-LM ``torch_dist`` checkpoint records, as GPTSettings.

Megatron-LM saves its argparse namespace as ``args`` in the checkpoint's common state, which
megatron-core's ``dist_checkpointing.save`` writes to ``common.pt``. Megatron-LM builds its
TransformerConfig from them by name (``core_transformer_config_from_args``: every field the
namespace has, with a few renamed: ``norm_epsilon``, ``apply_layernorm_1p``, ``num_experts``,
``swiglu``...) and its GPTModel from ``padded_vocab_size``, ``position_embedding_type``,
``rotary_*`` and ``untie_embeddings_and_output_weights``; so does ``settings_of_args``, for the
fields that change the math (``config_fields.FIELDS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os

import torch
import torch.nn.functional as F  # noqa: N812

from dcp_hf.megatron.config_fields import FIELDS, NotMath
from dcp_hf.megatron.hf_config import GPTSettings

COMMON_FILE = "common.pt"  # megatron.core.dist_checkpointing's common state
IMPORTED_CONFIG = "dcp_hf_config"  # the key under which an import records its HF config


def _common_state(src: str) -> dict | None:
    """The common state of ``src``'s common.pt (None where there is none), unpickled with
    torch's weights-only loader (argparse namespaces and megatron-core's enums allowed, nothing
    else executable)."""
    path = os.path.join(src, COMMON_FILE)
    if not os.path.isfile(path):
        return None
    from megatron.core.transformer import enums

    allowed = [argparse.Namespace, *(v for v in vars(enums).values() if isinstance(v, type) and v is not enum.Enum)]
    try:
        with torch.serialization.safe_globals(allowed):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - named with the file
        raise ValueError(f"{path}: cannot read the training arguments ({type(e).__name__}: {e})") from None
    return common if isinstance(common, dict) else None


def checkpoint_args(src: str) -> argparse.Namespace | None:
    """The ``args`` of ``src``'s common.pt; None where the checkpoint has no common.pt or it
    holds no arguments."""
    args = (_common_state(src) or {}).get("args")
    return args if isinstance(args, argparse.Namespace) else None


def imported_config(src: str) -> dict | None:
    """The HF config a ``dcp-hf import`` of ``src`` was made from (it records it in common.pt as
    ``dcp_hf_config``), or None."""
    config = (_common_state(src) or {}).get(IMPORTED_CONFIG)
    return config if isinstance(config, dict) else None


def settings_of_args(args: argparse.Namespace, where: str = "args") -> GPTSettings:
    """The GPTSettings of the model Megatron-LM builds from ``args``."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    a = vars(args)
    cls = MLATransformerConfig if a.get("multi_latent_attention") else TransformerConfig
    math = {f.name for f in dataclasses.fields(cls) if not isinstance(FIELDS.get(f.name), NotMath)}
    kw = {name: a[name] for name in math if name in a}
    renamed = {
        "layernorm_epsilon": "norm_epsilon",
        "layernorm_zero_centered_gamma": "apply_layernorm_1p",
        "num_moe_experts": "num_experts",
    }
    kw.update({ours: a[theirs] for ours, theirs in renamed.items() if theirs in a})
    if not a.get("group_query_attention", False):
        kw["num_query_groups"] = None
    if a.get("swiglu"):
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    elif a.get("quick_geglu"):
        from megatron.core.activations import quick_gelu

        kw.update(activation_func=quick_gelu, gated_linear_unit=True)
    elif a.get("squared_relu"):
        from megatron.core.activations import squared_relu

        kw.update(activation_func=squared_relu, gated_linear_unit=False)
    else:
        kw.update(activation_func=F.gelu, gated_linear_unit=False)
    kw.setdefault("normalization", "LayerNorm")  # Megatron-LM's default
    try:
        config = cls(**kw, use_cpu_initialization=True)
    except Exception as e:  # noqa: BLE001 - megatron-core's own validation of the arguments
        raise ValueError(f"{where}: the training arguments do not make a TransformerConfig: {e}") from None
    gpt = dict(
        vocab_size=a.get("padded_vocab_size"),
        max_sequence_length=a.get("max_position_embeddings"),
        share_embeddings_and_output_weights=not a.get("untie_embeddings_and_output_weights", False),
        position_embedding_type=a.get("position_embedding_type", "learned_absolute"),
        rotary_percent=a.get("rotary_percent", 1.0),
        rotary_base=a.get("rotary_base", 10000),
        rope_scaling=bool(a.get("use_rope_scaling", False)),
        rope_scaling_factor=a.get("rope_scaling_factor", 8.0),
        seq_len_interpolation_factor=a.get("rotary_seq_len_interpolation_factor"),
    )
    return GPTSettings.of_config(config, gpt)
