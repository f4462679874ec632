"""What transformers expects in a checkpoint of a config.json, to check an export against
before a byte is written.

The model class of the config is built on the meta device (no memory); its state dict, minus
the weights transformers ties and put back into the names and shapes ``save_pretrained``
writes (transformers v5 fuses experts in memory), is the expected set of tensors.
Multi-token-prediction layers, which transformers does not model, are expected as the last
decoder layer's tensors plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.{norm,head}``
and ``embed_tokens``, at layers ``num_hidden_layers + N``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Expected:
    """One tensor transformers expects: its shape and the dtypes it accepts (the config's,
    or fp32 where the model keeps a module in fp32)."""

    shape: tuple[int, ...]
    dtypes: frozenset


def expected_tensors(hf: dict) -> dict[str, Expected]:
    """name -> Expected for the HF config dict ``hf`` (a causal LM of the installed transformers)."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[hf["model_type"]].from_dict(dict(hf))
    dtype = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch."))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    out = {k: Expected(tuple(v.shape), frozenset({v.dtype, dtype})) for k, v in state.items()}
    layers = hf["num_hidden_layers"]
    mtp = hf.get("num_nextn_predict_layers") or 0
    if mtp:
        hidden, vocab = hf["hidden_size"], hf["vocab_size"]
        last = f"model.layers.{layers - 1}."
        own = {
            "enorm.weight": (hidden,),
            "hnorm.weight": (hidden,),
            "eh_proj.weight": (hidden, 2 * hidden),
            "shared_head.norm.weight": (hidden,),
            "shared_head.head.weight": (vocab, hidden),
            "embed_tokens.weight": (vocab, hidden),
        }
        for n in range(mtp):
            base = f"model.layers.{layers + n}."
            for k, v in list(out.items()):
                if k.startswith(last):
                    out[base + k[len(last) :]] = v
            for k, shape in own.items():
                out[base + k] = Expected(shape, frozenset({dtype}))
    return out


def check_against_transformers(
    hf: dict, written: dict[str, tuple[tuple[int, ...], torch.dtype]], where: str = "export"
) -> None:
    """Raise naming every difference between the tensors an export will write (name -> (shape,
    dtype)) and those transformers expects for ``hf``."""
    want = expected_tensors(hf)
    missing = sorted(set(want) - set(written), key=_natural)
    extra = sorted(set(written) - set(want), key=_natural)
    shapes = [
        f"{k}: {list(written[k][0])} written, {list(want[k].shape)} expected"
        for k in sorted(set(want) & set(written), key=_natural)
        if tuple(written[k][0]) != want[k].shape
    ]
    dtypes = [
        f"{k}: {written[k][1]} written, {' or '.join(sorted(map(str, want[k].dtypes)))} expected"
        for k in sorted(set(want) & set(written), key=_natural)
        if written[k][1] not in want[k].dtypes
    ]
    problems = []
    for what, keys, hint in (
        ("missing", missing, ""),
        ("not in the model", extra, ""),
        ("of another shape", shapes, ""),
        ("of another dtype", dtypes, " (pass dtype= to cast the export)"),
    ):
        if keys:
            problems.append(
                f"{len(keys)} tensor(s) {what}{hint}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            )
    if problems:
        arch = (hf.get("architectures") or [hf.get("model_type")])[0]
        raise ValueError(
            f"{where}: the checkpoint would not be what transformers' {arch} expects "
            f"for this config.json; nothing written. " + "; ".join(problems)
        )


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
