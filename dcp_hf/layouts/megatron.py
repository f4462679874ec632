"""Megatron-core GPT models: sharded-state-dict keys -> HF (Llama/Mistral/Qwen/Mixtral/GLM/DeepSeek) tensors.

Keys are Megatron's *sharded* keys (``ShardedTensor.key``), so the local and Transformer-Engine
layer specs and the sequential, TE-grouped and legacy grouped experts map the same way. Two
forms occur and both are handled:

- ``sharded_state_dict(metadata={"singleton_local_shards": True})`` (what ``save_hf``/``load_hf``
  use): one key per layer and expert (``decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight_w``),
  gated ``linear_fc1`` already split into ``weight_w`` (gate) and ``weight_v`` (up);
- the default form, found in ``torch_dist`` checkpoints: layers stacked on a leading axis
  (``decoder.layers.self_attention.linear_qkv.weight`` of shape [L, ...]), experts on the next
  one ([L, E, ...]), gated ``linear_fc1`` as [gate; up] rows of one tensor.

Multi-token-prediction layers (``mtp.layers.N.*``) are HF layer ``num_layers + N`` with
``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``; on export their ``embed_tokens`` and
``shared_head.head`` are copies of the model's embedding and output layer (Megatron shares them).

Every transform is a set of boxes (``Piece``), so a rank reads and writes only its own slice:
fused QKV rows are [q (heads per group x d) | k (d) | v (d)] per query group; word embeddings
and the output layer have padded vocab rows beyond the HF vocab size, which are not saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product

from dcp_hf.errors import StateDictMismatchError
from dcp_hf.layouts.core import Layout, Piece

# What each kind of tensor becomes. SAME: one HF tensor of the same shape. VOCAB: the first
# ``vocab_size`` rows. QKV: per-group q/k/v rows. GLU: [gate; up] rows.
SAME, VOCAB, QKV, GLU = "same", "vocab", "qkv", "glu"

# The declarative tables. Megatron suffix -> (HF suffix, kind). A new family adds or swaps
# entries (e.g. another attention block) instead of code.
TOP_LEVEL = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", VOCAB),
    "output_layer.weight": ("lm_head.weight", VOCAB),
    "decoder.final_layernorm.weight": ("model.norm.weight", SAME),
    "decoder.final_layernorm.bias": ("model.norm.bias", SAME),
}
LAYER_NORMS = {  # local spec names and TE names (norm fused into the next linear)
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
}
GQA_ATTENTION = {
    "self_attention.linear_qkv.weight": (("q_proj", "k_proj", "v_proj"), QKV),
    "self_attention.linear_qkv.bias": (("q_proj", "k_proj", "v_proj"), QKV),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", SAME),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", SAME),  # Qwen3 qk norm
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", SAME),
}
MLA_ATTENTION = {  # DeepSeek-V2/V3 multi-latent attention
    "self_attention.linear_q_proj.weight": ("self_attn.q_proj.weight", SAME),  # q_lora_rank None
    "self_attention.linear_q_down_proj.weight": ("self_attn.q_a_proj.weight", SAME),
    "self_attention.linear_q_up_proj.weight": ("self_attn.q_b_proj.weight", SAME),
    "self_attention.linear_q_up_proj.layer_norm_weight": ("self_attn.q_a_layernorm.weight", SAME),
    "self_attention.q_layernorm.weight": ("self_attn.q_a_layernorm.weight", SAME),
    "self_attention.linear_kv_down_proj.weight": ("self_attn.kv_a_proj_with_mqa.weight", SAME),
    "self_attention.linear_kv_up_proj.weight": ("self_attn.kv_b_proj.weight", SAME),
    "self_attention.linear_kv_up_proj.layer_norm_weight": ("self_attn.kv_a_layernorm.weight", SAME),
    "self_attention.kv_layernorm.weight": ("self_attn.kv_a_layernorm.weight", SAME),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", SAME),
}
ROUTER = {  # {moe}: the HF module of the router and routed experts (mlp, block_sparse_moe)
    "mlp.router.weight": ("{moe}.gate.weight", SAME),
    "mlp.router.expert_bias": ("{moe}.gate.e_score_correction_bias", SAME),
    "mlp.shared_experts.gate_weight": ("mlp.shared_expert_gate.weight", SAME),  # Qwen2-MoE
}
GATE, UP, DOWN = 0, 1, 2  # an MLP's linears; HF names per container (gate_proj or Mixtral's w1 ...)
MLP = {  # a dense MLP, one routed expert or the shared experts: suffix inside the container
    "linear_fc1.weight_w": (GATE, SAME),
    "linear_fc1.weight_v": (UP, SAME),
    "linear_fc1.weight": ((GATE, UP), GLU),
    "linear_fc2.weight": (DOWN, SAME),
}
MTP = {  # a multi-token-prediction layer's own tensors (DeepSeek-V3, GLM-4.5)
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
}
MTP_COPIES = {  # Megatron's shared tensors, also stored in every HF MTP layer
    "embedding.word_embeddings.weight": "embed_tokens.weight",
    "output_layer.weight": "shared_head.head.weight",
}
DENSE_NAMES = ("gate_proj", "up_proj", "down_proj")

_LAYER = re.compile(r"decoder\.layers\.(?:(?P<layer>\d+)\.)?(?P<rest>.+)")
_MTP = re.compile(r"mtp\.layers\.(?P<layer>\d+)\.(?P<rest>.+)")
_EXPERT = re.compile(r"mlp\.experts\.experts\.(?:(?P<expert>\d+)\.)?(?P<rest>.+)")


@dataclass(frozen=True)
class MegatronGPT:
    """The rule of a Megatron GPT model (see the module doc). ``vocab_size``: the HF vocab
    size (rows of the embedding beyond it are padding); ``None`` keeps every row.
    ``moe_block``: the HF module of the router and routed experts (``block_sparse_moe`` for
    Mixtral); ``expert_names``: a routed expert's (gate, up, down) linears (Mixtral: w1, w3,
    w2); ``shared_experts``: the HF module of the shared experts (``shared_expert`` for
    Qwen2-MoE). ``num_layers``: decoder layers (MTP layer N is HF layer num_layers + N);
    ``mtp_copies``: MTP layers whose copies of the embedding and output layer are written
    (on export; a load reads the model's own). ``output``: the HF tensor of Megatron's output
    layer (``model.embed_tokens.weight`` to load an untied model from a tied checkpoint)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int | None = None
    attention: str = "gqa"
    moe_block: str = "mlp"
    expert_names: tuple[str, str, str] = DENSE_NAMES
    shared_experts: str = "shared_experts"
    num_layers: int | None = None
    mtp_copies: int = 0
    output: str = "lm_head.weight"
    attention_table: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be 'gqa' or 'mla', not {self.attention!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"{self.num_attention_heads} heads do not split into {self.num_query_groups} query groups")
        object.__setattr__(self, "attention_table", GQA_ATTENTION if self.attention == "gqa" else MLA_ATTENTION)

    # -- names ------------------------------------------------------------------------------
    def locate(self, key: str):
        """(HF name or names, kind, leading stacked axes) for a Megatron key, or None. HF
        names may hold ``{layer}`` and ``{expert}``; the stacked axes are ``"layer"`` and
        ``"expert"`` in order, each fixed by the key instead when it names one."""
        if key in TOP_LEVEL:
            name, kind = TOP_LEVEL[key]
            if key == "output_layer.weight":
                name = self.output
            if key in MTP_COPIES and self.mtp_copies:
                copies = tuple(f"model.layers.{self._mtp_layer(n)}.{MTP_COPIES[key]}" for n in range(self.mtp_copies))
                return (name, *copies), kind, (), {}
            return name, kind, (), {}
        axes, fixed = [], {}
        m = _MTP.fullmatch(key)
        if m is not None:
            fixed["layer"] = self._mtp_layer(int(m.group("layer")))
            rest = m.group("rest")
            if rest in MTP:
                return "model.layers.{layer}." + MTP[rest], SAME, (), fixed
            if not rest.startswith("transformer_layer."):
                return None
            rest = rest[len("transformer_layer.") :]
        else:
            m = _LAYER.fullmatch(key)
            if m is None:
                return None
            if m.group("layer") is None:
                axes.append("layer")
            else:
                fixed["layer"] = int(m.group("layer"))
            rest = m.group("rest")
        found = self._layer_entry(rest, axes, fixed)
        if found is None:
            return None
        name, kind = found
        return name, kind, tuple(axes), fixed

    def _mtp_layer(self, n: int) -> int:
        if self.num_layers is None:
            raise StateDictMismatchError("multi-token-prediction layers need the rule's num_layers")
        return self.num_layers + n

    def _layer_entry(self, rest: str, axes: list, fixed: dict):
        base = "model.layers.{layer}."
        if rest in LAYER_NORMS:
            return base + LAYER_NORMS[rest], SAME
        for table in (self.attention_table, ROUTER):
            if rest in table:
                name, kind = table[rest]
                if kind == QKV:
                    return tuple(f"{base}self_attn.{n}.{rest.rsplit('.', 1)[1]}" for n in name), kind
                return base + name.format(moe=self.moe_block), kind
        e = _EXPERT.fullmatch(rest)
        if e is not None:
            if e.group("expert") is None:
                axes.append("expert")
            else:
                fixed["expert"] = int(e.group("expert"))
            return self._mlp_entry(base + self.moe_block + ".experts.{expert}.", e.group("rest"), self.expert_names)
        for container, hf in (("mlp.shared_experts.", f"mlp.{self.shared_experts}."), ("mlp.", "mlp.")):
            if rest.startswith(container):
                return self._mlp_entry(base + hf, rest[len(container) :], DENSE_NAMES)
        return None

    @staticmethod
    def _mlp_entry(hf_base: str, rest: str, names: tuple[str, str, str]):
        if rest not in MLP:
            return None
        which, kind = MLP[rest]
        if isinstance(which, tuple):
            return tuple(f"{hf_base}{names[w]}.weight" for w in which), kind
        return f"{hf_base}{names[which]}.weight", kind

    # -- boxes ------------------------------------------------------------------------------
    def pieces(self, key: str, shape: tuple[int, ...], at: tuple[int, ...] | None = None) -> list[Piece] | None:
        """``at``: only the pieces of that position of the stacked axes (layer, expert),
        instead of every position's."""
        found = self.locate(key)
        if found is None:
            return None
        names, kind, axes, fixed = found
        lead = len(axes)
        if len(shape) <= lead:
            raise StateDictMismatchError(f"{key!r}: shape {list(shape)} lacks the stacked {'/'.join(axes)} axes")
        inner = tuple(shape[lead:])
        pieces = []
        positions = [tuple(at[:lead])] if at is not None else product(*(range(n) for n in shape[:lead]))
        for index in positions:
            where = dict(fixed, **dict(zip(axes, index)))
            for hf_name, hf_shape, sizes, hf_off, mem_off in self._inner(key, names, kind, inner):
                dims = tuple(range(lead, lead + len(inner)))
                pieces.append(Piece(hf_name.format(**where), hf_shape, sizes, hf_off, tuple(index) + mem_off, dims))
        return pieces

    def _inner(self, key, names, kind, shape):
        """(HF name, HF shape, box sizes, HF offsets, in-memory offsets) of one layer/expert."""
        zero = (0,) * len(shape)
        if kind == SAME:
            return [(names, shape, shape, zero, zero)]
        if kind == VOCAB:
            rows = self.vocab_size if self.vocab_size is not None else shape[0]
            if rows > shape[0]:
                raise StateDictMismatchError(f"{key!r}: {shape[0]} vocab rows, fewer than the HF vocab size {rows}")
            hf_shape = (rows,) + shape[1:]
            names = names if isinstance(names, tuple) else (names,)  # with MTP copies, several
            return [(n, hf_shape, hf_shape, zero, zero) for n in names]
        if kind == GLU:
            if shape[0] % 2:
                raise StateDictMismatchError(f"{key!r}: {shape[0]} rows are not [gate; up] halves")
            half = (shape[0] // 2,) + shape[1:]
            return [(names[0], half, half, zero, zero), (names[1], half, half, zero, (half[0],) + zero[1:])]
        return self._qkv(key, names, shape)

    def _qkv(self, key, names, shape):
        groups, d = self.num_query_groups, self.head_dim
        per_group = self.num_attention_heads // groups
        if shape[0] != groups * (per_group + 2) * d:
            raise StateDictMismatchError(
                f"{key!r}: {shape[0]} rows, expected {groups} query groups x ({per_group} + 2) "
                f"heads x {d} = {groups * (per_group + 2) * d}"
            )
        rest, zero = shape[1:], (0,) * (len(shape) - 1)
        q_shape = (groups * per_group * d,) + rest
        kv_shape = (groups * d,) + rest
        out = []
        for g in range(groups):
            row = g * (per_group + 2) * d
            out.append((names[0], q_shape, (per_group * d,) + rest, (g * per_group * d,) + zero, (row,) + zero))
            row += per_group * d
            out.append((names[1], kv_shape, (d,) + rest, (g * d,) + zero, (row,) + zero))
            out.append((names[2], kv_shape, (d,) + rest, (g * d,) + zero, (row + d,) + zero))
        return out

    def collect(self, specs):
        raise NotImplementedError(
            "an HF checkpoint cannot be turned into Megatron tensors without the model; build "
            "the model and use dcp_hf.megatron.load_hf"
        )


def megatron_layout(rule: MegatronGPT) -> Layout:
    """A strict layout: a Megatron key no table entry covers is an error naming it."""
    return Layout((rule,), strict=True, name=f"megatron-{rule.attention}")
