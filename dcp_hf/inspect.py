"""``dcp-hf inspect``: what a checkpoint holds, from its index and headers only."""

from __future__ import annotations

import math
import os
from collections import Counter

from dcp_hf.format import TensorSpec
from dcp_hf.format.dtypes import name_from_dtype
from dcp_hf.layouts.models import read_config
from dcp_hf.layouts.quantized import quantization_for_config
from dcp_hf.storage.reader import HFStorageReader


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\x1b``, ``\n``, ...): names come
    from the checkpoint, and must not drive the terminal."""
    return (
        text
        if text.isprintable()
        else "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    )


def quantized_tensors(path: str, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The logical tensors (dtype and shape as loaded) that quantized tensors of a checkpoint
    make up, by its config.json's ``quantization_config`` (local folders; none without it)."""
    config = read_config(path) if "://" not in path else None
    quantization = quantization_for_config(config) if config else None
    return quantization.collect(dict(specs)) if quantization else {}


def inspect_checkpoint(path: str, verbose: bool = False) -> str:
    """A checkpoint folder (or URL), or one ``.safetensors`` file."""
    single = os.path.isfile(path)
    reader = HFStorageReader(os.path.dirname(os.path.abspath(path)) if single else path)
    try:
        if single:
            name = os.path.basename(path)
            reader.load_headers([name])
            reader.weight_map = dict.fromkeys(reader.headers[name].tensors, name)
        else:
            reader.read_metadata()
            reader.load_headers(set(reader.weight_map.values()))
    finally:
        reader.close()
    lines, dtypes, total = [], Counter(), 0
    for file in sorted(reader.headers):
        header = reader.headers[file]
        size = sum(t.nbytes for t in header.tensors.values())
        lines.append(f"{printable(file)}: {len(header.tensors)} tensors, {size / 1e6:.1f} MB")
        for t in sorted(header.tensors.values(), key=lambda t: t.start):
            dtypes[name_from_dtype(t.dtype)] += t.nbytes
            total += t.nbytes
            if verbose:
                lines.append(f"  {printable(t.name)}  {name_from_dtype(t.dtype)}  {list(t.shape)}  {t.nbytes} bytes")
    specs = {k: TensorSpec(k, t.dtype, t.shape) for h in reader.headers.values() for k, t in h.tensors.items()}
    logical = quantized_tensors(reader.path, specs)
    if logical:
        lines.append(
            f"quantized: {len(logical)} tensors load dequantized (data + scales -> logical "
            f"dtype and shape), {sum(s.nbytes for s in logical.values()) / 1e9:.3f} GB as loaded"
        )
        if verbose:
            lines += [
                f"  {printable(s.key)}  {name_from_dtype(s.dtype)}  {list(s.shape)}"
                for s in sorted(logical.values(), key=lambda s: s.key)
            ]
    params = sum(math.prod(t.shape) for h in reader.headers.values() for t in h.tensors.values())
    lines.append(
        f"total: {len(reader.weight_map)} tensors in {len(reader.headers)} files, "
        f"{params:,} elements, {total / 1e9:.3f} GB ("
        + ", ".join(f"{d} {n / 1e9:.3f} GB" for d, n in dtypes.most_common())
        + ")"
    )
    return "\n".join(lines)
