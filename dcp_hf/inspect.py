"""``dcp-hf inspect``: what a checkpoint holds, from its index and headers only."""

from __future__ import annotations

import math
import os
from collections import Counter

from dcp_hf.format.dtypes import name_from_dtype
from dcp_hf.storage.reader import HFStorageReader


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\x1b``, ``\n``, ...): names come
    from the checkpoint, and must not drive the terminal."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


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
                lines.append(f"  {printable(t.name)}  {name_from_dtype(t.dtype)}  {list(t.shape)}  "
                             f"{t.nbytes} bytes")
    params = sum(math.prod(t.shape) for h in reader.headers.values() for t in h.tensors.values())
    lines.append(f"total: {len(reader.weight_map)} tensors in {len(reader.headers)} files, "
                 f"{params:,} elements, {total / 1e9:.3f} GB ("
                 + ", ".join(f"{d} {n / 1e9:.3f} GB" for d, n in dtypes.most_common()) + ")")
    return "\n".join(lines)
