"""The safetensors dtype names and their torch dtypes."""

from __future__ import annotations

import torch

from dcp_hf.errors import CheckpointFormatError

_NAME_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}
_DTYPE_TO_NAME = {dtype: name for name, dtype in _NAME_TO_DTYPE.items()}


def dtype_from_name(name: str, *, where: str = "") -> torch.dtype:
    try:
        return _NAME_TO_DTYPE[name]
    except (KeyError, TypeError):
        raise CheckpointFormatError(f"{where}unknown safetensors dtype {name!r}") from None


def name_from_dtype(dtype: torch.dtype, *, key: str = "") -> str:
    try:
        return _DTYPE_TO_NAME[dtype]
    except KeyError:
        raise TypeError(
            f"{key!r}: dtype {dtype} cannot be stored in safetensors "
            f"(supported: {', '.join(str(d) for d in _DTYPE_TO_NAME)})"
        ) from None


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
