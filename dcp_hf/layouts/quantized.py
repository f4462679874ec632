"""Quantized checkpoints: tensors stored as quantized data plus scales, read dequantized.

- ``BlockFP8`` (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8): ``X.weight`` F8_E4M3
  [R, C] and ``X.weight_scale_inv`` [ceil(R/128), ceil(C/128)]; value = weight.float() * the
  scale of its 128x128 block (edge blocks are partial).
- ``MXFP4`` (GPT-OSS): ``X_blocks`` U8 [..., G, 16] (two E2M1 values per byte, low nibble
  first) and ``X_scales`` U8 [..., G] (E8M0 exponents); ``X`` = fp4 table[nibble] * 2^(e-127),
  of shape [..., G*32].

A quantization is part of a :class:`~dcp_hf.layouts.Layout`: it applies to the HF tensors the
layout's pieces name (after renames and rules). For a box of a logical tensor it names the
boxes of the stored tensors that hold it (the weight box itself and the scale blocks that
cover it, or the covering groups), and dequantizes them into the destination view; the load
planner reads those boxes into temporaries and dequantizes when both have arrived. So a rank
reads only its rows/columns plus the scales of the blocks it touches, wherever they sit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from dcp_hf.boxes import Box
from dcp_hf.errors import CheckpointFormatError, StateDictMismatchError
from dcp_hf.format import TensorSpec
from dcp_hf.layouts.core import Piece

# Bytes of float32 temporaries a dequantization holds at once (it works in slabs of dim 0).
SLAB_BYTES = 64 << 20
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn: scale = amax / FP8_MAX


@dataclass(frozen=True)
class StoredTensor:
    """One stored tensor of a quantized tensor (its data or its scales)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class QuantizedTensor:
    """A logical HF tensor ``key`` of ``shape`` stored as ``data`` + ``scale`` by ``scheme``."""

    key: str
    shape: tuple[int, ...]
    data: StoredTensor
    scale: StoredTensor
    scheme: BlockFP8 | MXFP4

    @property
    def stored(self) -> tuple[StoredTensor, StoredTensor]:
        return self.data, self.scale

    def boxes(self, offsets, sizes) -> tuple[Box, Box]:
        """The boxes of (data, scale) that hold the logical box (offsets, sizes)."""
        return self.scheme.boxes(self, tuple(offsets), tuple(sizes))

    def dequantize(self, data: torch.Tensor, scale: torch.Tensor, offsets, sizes, out: torch.Tensor) -> None:
        """Write the logical box (offsets, sizes) into ``out`` (any strides, its dtype) from the
        boxes of data and scale that :meth:`boxes` named."""
        if out.dim() == 1:  # one leading dim of extent 1, so the schemes work in slabs of dim 0
            data, scale, out = data[None], scale[None], out[None]
            offsets, sizes = (0, *offsets), (1, *sizes)
        self.scheme.dequantize(data, scale, tuple(offsets), tuple(sizes), out)


def _part(stored, key: str) -> StoredTensor:
    md = stored[key]
    return StoredTensor(key, md.properties.dtype, tuple(md.size))


def _check_destination(where: str, key: str, data: StoredTensor, dest_dtype: torch.dtype) -> None:
    if not dest_dtype.is_floating_point or dest_dtype.itemsize < 2:
        raise StateDictMismatchError(
            f"{where}: {key!r} is quantized ({data.key!r} is {data.dtype}); it loads dequantized into "
            f"a float16/bfloat16/float32 destination, not {dest_dtype}"
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockFP8:
    """FP8 weights with one scale per ``block`` (rows x columns) of a 2-D weight, stored as
    ``key + scale_suffix`` (``weight_scale_inv``); dequantized as weight.float() * scale."""

    block: tuple[int, int] = (128, 128)
    dtype: torch.dtype = torch.float8_e4m3fn
    scale_suffix: str = "_scale_inv"
    logical_dtype: torch.dtype = torch.bfloat16  # what ``memory_specs`` reports
    # On save: the 2-D HF tensors to quantize (the linear weights of attention and MLP/experts,
    # as DeepSeek-V3 releases them; not norms, embeddings, the router or lm_head).
    save_pattern: str = r".*\.(self_attn|mlp)\..*_proj(_with_mqa)?\.weight"

    def quantizes(self, key: str, shape) -> bool:
        return len(shape) == 2 and re.fullmatch(self.save_pattern, key) is not None

    def config(self) -> dict:
        """The ``quantization_config`` of config.json for checkpoints saved with this."""
        fmt = {v: k for k, v in FP8_FORMATS.items()}[self.dtype]
        return {
            "quant_method": "fp8",
            "fmt": fmt,
            "weight_block_size": list(self.block),
            "activation_scheme": "dynamic",
        }

    def block_amax(self, box: torch.Tensor, offsets) -> torch.Tensor:
        """amax(|x|) (float32) of each block the box at ``offsets`` touches, over its part."""
        (b0, b1), (r, c) = self.block, offsets
        lead = c - c // b1 * b1
        n_cols = _ceil_div(lead + box.shape[1], b1)
        rows = []
        for i0 in range(-(r % b0), box.shape[0], b0):  # one block row at a time
            part = box[max(i0, 0) : i0 + b0].float().abs()
            padded = torch.zeros(part.shape[0], n_cols * b1)
            padded[:, lead : lead + box.shape[1]] = part
            rows.append(padded.view(part.shape[0], n_cols, b1).amax(dim=(0, 2)))
        return torch.stack(rows)

    def quantize(self, box: torch.Tensor, scale: torch.Tensor, offsets) -> torch.Tensor:
        """The fp8 data of the box at ``offsets``: x.float() / the scale of its block (``scale``
        covers the blocks the box touches)."""
        rows, cols = (torch.arange(o, o + n) // b - o // b for o, n, b in zip(offsets, box.shape, self.block))
        out = torch.empty(box.shape, dtype=self.dtype)
        step = max(1, SLAB_BYTES // max(8 * box.shape[1], 1))
        for r0 in range(0, box.shape[0], step):
            s = scale.index_select(0, rows[r0 : r0 + step]).index_select(1, cols)
            out[r0 : r0 + step] = (box[r0 : r0 + step].float() / s).to(self.dtype)
        return out

    def stored_keys(self, key: str) -> tuple[str, ...]:
        return key, key + self.scale_suffix

    def find(self, key: str, stored, dest_dtype: torch.dtype, where: str) -> QuantizedTensor | None:
        """``key`` as a quantized tensor of the checkpoint, or None where it is stored plainly
        (or the destination asks for the raw fp8 values)."""
        if key not in stored:
            return None
        data = _part(stored, key)
        if data.dtype != self.dtype or dest_dtype == self.dtype:
            return None
        scale_key = key + self.scale_suffix
        if scale_key not in stored:
            raise CheckpointFormatError(
                f"{where}: {key!r} is {data.dtype} but the checkpoint has no {scale_key!r}: no "
                f"block scales to dequantize it with"
            )
        _check_destination(where, key, data, dest_dtype)
        scale = _part(stored, scale_key)
        want = tuple(_ceil_div(n, b) for n, b in zip(data.shape, self.block))
        if len(data.shape) != 2 or scale.shape != want:
            raise CheckpointFormatError(
                f"{where}: {scale_key!r} has shape {list(scale.shape)}; {key!r} of shape "
                f"{list(data.shape)} in {self.block[0]}x{self.block[1]} blocks needs a 2-D weight "
                f"and scales of shape {list(want)}"
            )
        return QuantizedTensor(key, data.shape, data, scale, self)

    def boxes(self, q: QuantizedTensor, offsets, sizes) -> tuple[Box, Box]:
        lo = tuple(o // b for o, b in zip(offsets, self.block))
        hi = tuple(_ceil_div(o + n, b) for o, n, b in zip(offsets, sizes, self.block))
        return (offsets, sizes), (lo, tuple(h - low for h, low in zip(hi, lo)))

    def dequantize(self, data, scale, offsets, sizes, out) -> None:
        # One block row at a time: its rows share one row of scales, spread over the columns.
        (b0, b1), (r, c) = self.block, offsets
        cols = torch.arange(c, c + sizes[1]) // b1 - c // b1
        for i, r0 in enumerate(range(-(r % b0), sizes[0], b0)):
            rows = slice(max(r0, 0), r0 + b0)
            x = data[rows].float()
            x *= scale[i].index_select(0, cols)
            out[rows].copy_(x)  # the same rounding as x.to(out.dtype)

    def collect(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Claim each fp8 weight and its scales; they make up one ``logical_dtype`` tensor."""
        out = {}
        for key in [k for k, s in specs.items() if s.dtype == self.dtype]:
            if key + self.scale_suffix in specs:
                spec = specs.pop(key)
                specs.pop(key + self.scale_suffix)
                out[key] = TensorSpec(key, self.logical_dtype, spec.shape)
        return out


@dataclass(frozen=True)
class MXFP4:
    """OCP MX FP4 as GPT-OSS stores it: ``X_blocks`` + ``X_scales`` make up ``X``."""

    blocks_suffix: str = "_blocks"
    scales_suffix: str = "_scales"
    logical_dtype: torch.dtype = torch.bfloat16

    def stored_keys(self, key: str) -> tuple[str, ...]:
        return key + self.blocks_suffix, key + self.scales_suffix

    def find(self, key: str, stored, dest_dtype: torch.dtype, where: str) -> QuantizedTensor | None:
        blocks_key, scales_key = self.stored_keys(key)
        if key in stored or blocks_key not in stored:
            return None
        if scales_key not in stored:
            raise CheckpointFormatError(
                f"{where}: the checkpoint has {blocks_key!r} but no {scales_key!r}: no MXFP4 scales "
                f"to dequantize {key!r} with"
            )
        data, scale = _part(stored, blocks_key), _part(stored, scales_key)
        _check_destination(where, key, data, dest_dtype)
        if (
            data.dtype != torch.uint8
            or scale.dtype != torch.uint8
            or len(data.shape) < 2
            or data.shape[:-1] != scale.shape
        ):
            raise CheckpointFormatError(
                f"{where}: {blocks_key!r} ({data.dtype} {list(data.shape)}) and {scales_key!r} "
                f"({scale.dtype} {list(scale.shape)}) are not MXFP4 blocks [..., G, B] and scales "
                f"[..., G] of uint8"
            )
        return QuantizedTensor(key, self.logical_shape(data.shape), data, scale, self)

    @staticmethod
    def logical_shape(blocks_shape) -> tuple[int, ...]:
        *lead, groups, width = blocks_shape
        return (*lead, groups * width * 2)

    def boxes(self, q: QuantizedTensor, offsets, sizes) -> tuple[Box, Box]:
        width = q.data.shape[-1]
        g0 = offsets[-1] // (2 * width)
        g1 = _ceil_div(offsets[-1] + sizes[-1], 2 * width)
        lead_o, lead_s = offsets[:-1], sizes[:-1]
        return ((*lead_o, g0, 0), (*lead_s, g1 - g0, width)), ((*lead_o, g0), (*lead_s, g1 - g0))

    def dequantize(self, data, scale, offsets, sizes, out) -> None:
        values = 2 * data.shape[-1]
        first = offsets[-1] % values  # where the box starts inside the first group read
        lut = torch.tensor(FP4_VALUES, dtype=out.dtype)
        step = max(1, SLAB_BYTES // max(4 * values * math.prod(data.shape[1:-1]), 1))
        for r0 in range(0, data.shape[0], step):
            blk, exp = data[r0 : r0 + step], scale[r0 : r0 + step]
            # As transformers' convert_moe_packed_tensors (and OpenAI's reference): low nibble
            # first, then ldexp by the E8M0 exponent, in the destination dtype.
            tmp = torch.empty(*blk.shape[:-1], values, dtype=out.dtype)
            tmp[..., 0::2] = lut[(blk & 0x0F).to(torch.int)]
            tmp[..., 1::2] = lut[(blk >> 4).to(torch.int)]
            torch.ldexp(tmp, (exp.to(torch.int32) - 127).unsqueeze(-1), out=tmp)
            flat = tmp.reshape(*tmp.shape[:-2], -1)
            out[r0 : r0 + step].copy_(flat[..., first : first + sizes[-1]])

    def collect(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        out = {}
        for key in [k for k in specs if k.endswith(self.blocks_suffix)]:
            base = key[: -len(self.blocks_suffix)]
            if base + self.scales_suffix in specs and base not in specs:
                spec = specs.pop(key)
                specs.pop(base + self.scales_suffix)
                out[base] = TensorSpec(base, self.logical_dtype, self.logical_shape(spec.shape))
        return out


@dataclass(frozen=True)
class SwapLastDims:
    """A rule: in-memory tensors whose key ends with one of ``suffixes`` are their HF tensor
    with the last two dims swapped (GPT-OSS experts: transformers keeps ``gate_up_proj``
    [E, H, 2F], the MXFP4 release stores it as [E, 2F, H/32, 16])."""

    suffixes: tuple[str, ...]

    def pieces(self, key: str, shape: tuple[int, ...]) -> list[Piece] | None:
        if not key.endswith(self.suffixes) or len(shape) < 2:
            return None
        n = len(shape)
        dims = (*range(n - 2), n - 1, n - 2)
        hf_shape = tuple(shape[d] for d in dims)
        return [Piece(key, hf_shape, hf_shape, (0,) * n, (0,) * n, dims)]

    def collect(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        out = {}
        for key in [k for k, s in specs.items() if k.endswith(self.suffixes) and len(s.shape) >= 2]:
            spec = specs.pop(key)
            out[key] = TensorSpec(key, spec.dtype, (*spec.shape[:-2], spec.shape[-1], spec.shape[-2]))
        return out


GPT_OSS_EXPERTS = SwapLastDims(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def quantization_for_config(config: dict):
    """The quantization of a checkpoint from its config.json ``quantization_config`` (None when
    it has none); a method this module cannot read is an error rather than a wrong load."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    logical = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), None)
    logical = logical if isinstance(logical, torch.dtype) and logical.is_floating_point else torch.bfloat16
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        block = qc.get("weight_block_size")
        if fmt not in FP8_FORMATS or not block or len(block) != 2:
            raise ValueError(
                f"quantization_config {qc}: dcp-hf reads FP8 {sorted(FP8_FORMATS)} with 2-D weight_block_size only"
            )
        return BlockFP8(tuple(int(b) for b in block), FP8_FORMATS[fmt], logical_dtype=logical)
    if method == "mxfp4":
        return MXFP4(logical_dtype=logical)
    raise ValueError(
        f"quantization_config: quant_method {method!r} is not supported by dcp-hf (fp8 with weight_block_size, mxfp4)"
    )


def quantized_config(quantization: BlockFP8, config: dict | str | None = None) -> dict:
    """``config`` (a dict, or a config.json or folder to read it from) with the
    ``quantization_config`` of checkpoints saved through ``quantization``: pass it to
    ``HFStorageWriter(config=...)``, which commits it with the weights."""
    from dcp_hf.storage.hf_files import config_dict

    base = config_dict(config) if config is not None else {}
    return dict(base, quantization_config=quantization.config())
