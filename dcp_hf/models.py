"""Llama-shaped state dicts with HF key names, for the demo, tests and benchmarks."""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 512
    layers: int = 4
    intermediate: int = 1376
    vocab: int = 8000
    heads: int = 8
    kv_heads: int = 2
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """HF key -> shape, in the order transformers lists them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out |= {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        out["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    def hf_config(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """A config.json that lets ``AutoModelForCausalLM.from_pretrained`` load the checkpoint."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "head_dim": self.head_dim,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def describe(self) -> dict:
        return asdict(self)


LLAMA_1B_LIKE = LlamaShape(
    hidden=2048, layers=12, intermediate=8192, vocab=128256, heads=32, kv_heads=8, tie_embeddings=True
)  # ~2.0 GB in bf16


def tensor_parallel_dim(key: str) -> int:
    """The dim Megatron-style TP shards: rows for column-parallel, columns for row-parallel."""
    return 1 if key.endswith(("o_proj.weight", "down_proj.weight")) else 0


_BITS = {
    1: (torch.uint8, 0x3F),
    2: (torch.int16, 0x3FFF),
    4: (torch.int32, 0x3FFFFFFF),
    8: (torch.int64, 0x3FFFFFFFFFFFFFFF),
}


def pattern_chunk(
    key: str,
    shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    dtype: torch.dtype,
    seed: int = 0,
) -> torch.Tensor:
    """The box (offsets, sizes) of a deterministic pseudo-random tensor of ``shape``, computed
    from global element indices: any rank builds exactly its own chunk, never the full tensor.
    Floating values stay finite (the top exponent bits are cleared)."""
    rows = sizes[0] if sizes else 1
    step = max(1, (1 << 22) // max(1, math.prod(sizes[1:])))
    if rows > step:  # bound the int64 index temporaries
        out = torch.empty(sizes, dtype=dtype)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[r0:r1] = pattern_chunk(
                key, shape, (offsets[0] + r0,) + tuple(offsets[1:]), (r1 - r0,) + tuple(sizes[1:]), dtype, seed
            )
        return out
    width = torch.empty((), dtype=dtype).element_size()
    int_dtype, mask = _BITS[width]
    salt = (zlib.crc32(key.encode()) + 7919 * seed) & 0xFFFFFF
    index = torch.zeros(sizes, dtype=torch.int64)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        along = torch.arange(offsets[d], offsets[d] + sizes[d], dtype=torch.int64) * stride
        index += along.view([-1 if i == d else 1 for i in range(len(shape))])
        stride *= shape[d]
    bits = (((index * 2654435761 + salt) ^ (index >> 5)) & mask).to(int_dtype)
    return (bits & 1).bool() if dtype == torch.bool else bits.view(dtype)


def pattern_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return pattern_chunk(key, shape, (0,) * len(shape), shape, dtype, seed)
