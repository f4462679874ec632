"""Merged MoE experts: all experts of a layer in one tensor in memory, one tensor per expert
and projection in the HF checkpoint.

Styles (E experts, F expert FFN size, H hidden size; HF gate/up are [F, H], down is [H, F]):

- ``transformers`` (transformers v5 fused experts): ``gate_up_proj`` [E, 2F, H] with
  gate_up[e] = cat(gate_e, up_e); ``down_proj`` [E, H, F] with down[e] = down_e.
- ``mindspeed`` (MindSpeed-MM): ``gate_up_proj`` [E, H, 2F] = cat(gate_e, up_e).T;
  ``down_proj`` [E, F, H] = down_e.T.
- ``flat`` (MindSpeed-MM for InternVL3.5 and GLM-4.5V): the ``mindspeed`` form viewed 2-D:
  [E*H, 2F] and [E*F, H].

A rule merges every ``...experts.{e}.*`` group it finds, or, given ``mlp_key`` (the HF name of
layer ``{layer}``'s MLP) and a layer range, exactly the MLPs of those layers, all of which must
be there (as MindSpeed-MM's ``moe_expert``: dense layers below it and layers past it, such as
a talker's or an MTP layer's experts, are left as they are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dcp_hf.errors import CheckpointFormatError, StateDictMismatchError
from dcp_hf.format import TensorSpec
from dcp_hf.layouts.core import Piece

STYLES = ("transformers", "mindspeed", "flat")


@dataclass(frozen=True)
class MergedExperts:
    style: str = "transformers"
    num_experts: int | None = None  # required by ``flat``, checked otherwise
    container: str = "experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    hf_gate: str = "gate_proj.weight"
    hf_up: str = "up_proj.weight"
    hf_down: str = "down_proj.weight"
    mlp_key: str | None = None  # e.g. "model.layers.{layer}.mlp"; None: any MLP
    first_layer: int = 0
    num_layers: int | None = None  # with mlp_key: layers first_layer..num_layers-1 are merged

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown merged-experts style {self.style!r}; one of {STYLES}")
        if self.style == "flat" and not self.num_experts:
            raise ValueError("the flat merged-experts style needs num_experts")
        if self.mlp_key is not None and (self.num_layers is None or "{layer}" not in self.mlp_key):
            raise ValueError("mlp_key needs a '{layer}' field and num_layers")

    def _owns(self, prefix: str) -> bool:
        """Whether this rule merges the experts of the MLP named ``prefix``."""
        if self.mlp_key is None:
            return True
        pattern = re.escape(self.mlp_key).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
        m = re.fullmatch(pattern, prefix)
        return m is not None and self.first_layer <= int(m.group("layer")) < self.num_layers

    def merged_keys(self, prefix: str) -> tuple[str, str]:
        """The merged (gate_up, down) keys of the MLP named ``prefix``."""
        base = f"{prefix}.{self.container}."
        return base + self.gate_up, base + self.down

    def layer_mlps(self) -> list[str]:
        """With ``mlp_key``: the MLPs this rule merges, all of which must be in a checkpoint."""
        if self.mlp_key is None:
            return []
        return [self.mlp_key.format(layer=n) for n in range(self.first_layer, self.num_layers)]

    def _hf_key(self, prefix: str, e: int, name: str) -> str:
        return f"{prefix}.{self.container}.{e}.{name}"

    def pieces(self, key: str, shape: tuple[int, ...]) -> list[Piece] | None:
        m = re.fullmatch(
            rf"(?P<p>.+)\.{re.escape(self.container)}\.(?P<w>"
            rf"{re.escape(self.gate_up)}|{re.escape(self.down)})",
            key,
        )
        if m is None or not self._owns(m.group("p")):
            return None
        prefix = m.group("p")
        n_experts, rows, cols = self._dims(key, shape)
        pieces = []
        for e in range(n_experts):
            if m.group("w") == self.gate_up:  # rows = 2F, cols = H: gate and up are [F, H]
                half = rows // 2
                for row0, name in ((0, self.hf_gate), (half, self.hf_up)):
                    pieces.append(self._piece(self._hf_key(prefix, e, name), (half, cols), e, row0))
            else:  # rows = H, cols = F: down is [H, F]
                pieces.append(self._piece(self._hf_key(prefix, e, self.hf_down), (rows, cols), e, 0))
        return pieces

    def _dims(self, key: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(E, rows, cols) of the per-expert matrix stacked in the merged tensor: (2F, H) for
        gate_up, (H, F) for down."""
        want = 2 if self.style == "flat" else 3
        if len(shape) != want:
            raise StateDictMismatchError(
                f"{key!r}: merged experts in {self.style!r} style need a {want}-D tensor, got {list(shape)}"
            )
        if self.style == "transformers":
            E, rows, cols = shape  # noqa: N806
        elif self.style == "mindspeed":
            E, cols, rows = shape  # noqa: N806
        else:
            E = self.num_experts  # noqa: N806
            if shape[0] % E:
                raise StateDictMismatchError(f"{key!r}: {shape[0]} rows do not split into {E} experts")
            cols, rows = shape[0] // E, shape[1]
        if self.num_experts is not None and E != self.num_experts:
            raise StateDictMismatchError(f"{key!r}: {E} experts, the layout expects {self.num_experts}")
        is_gate_up = key.endswith(self.gate_up)
        if is_gate_up and rows % 2:
            raise StateDictMismatchError(f"{key!r}: gate_up size {rows} is odd; it must be 2 x F")
        return E, rows, cols

    def _piece(self, hf_key: str, hf_shape: tuple[int, int], e: int, row0: int) -> Piece:
        """Expert e's HF matrix, whose row 0 is row ``row0`` of the stacked per-expert matrix."""
        cols = hf_shape[1]
        if self.style == "transformers":  # [E, rows.., cols]
            return Piece(hf_key, hf_shape, hf_shape, (0, 0), (e, row0, 0), (1, 2))
        if self.style == "mindspeed":  # [E, cols, rows..]: transposed
            return Piece(hf_key, hf_shape, hf_shape, (0, 0), (e, 0, row0), (2, 1))
        return Piece(hf_key, hf_shape, hf_shape, (0, 0), (e * cols, row0), (1, 0))  # flat

    def collect(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        names = {self.hf_gate: "gate", self.hf_up: "up", self.hf_down: "down"}
        pattern = re.compile(
            rf"(?P<p>.+)\.{re.escape(self.container)}\.(?P<e>\d+)\.(?P<w>" + "|".join(re.escape(n) for n in names) + ")"
        )
        groups: dict[str, dict[tuple[int, str], TensorSpec]] = {}
        for key, spec in specs.items():
            m = pattern.fullmatch(key)
            if m and self._owns(m.group("p")):
                groups.setdefault(m.group("p"), {})[int(m.group("e")), names[m.group("w")]] = spec
        for prefix in self.layer_mlps():
            if prefix not in groups:
                raise CheckpointFormatError(
                    f"expert tensor {self._hf_key(prefix, 0, self.hf_gate)!r} is missing from the "
                    f"checkpoint; layers {self.first_layer}..{self.num_layers - 1} of "
                    f"{self.mlp_key!r} are MoE layers whose experts are merged"
                )
        out = {}
        for prefix, found in groups.items():
            E = max(e for e, _ in found) + 1  # noqa: N806
            if self.num_experts is not None and E != self.num_experts:
                raise CheckpointFormatError(
                    f"{prefix}.{self.container}: {E} experts in the checkpoint, the layout expects {self.num_experts}"
                )
            for e in range(E):
                for name, kind in names.items():
                    if (e, kind) not in found:
                        raise CheckpointFormatError(
                            f"expert tensor {self._hf_key(prefix, e, name)!r} is missing from the "
                            f"checkpoint; every expert of a merged layer must be present"
                        )
            gate = found[0, "gate"]
            F, H = gate.shape  # noqa: N806
            for (e, kind), spec in found.items():
                want = (H, F) if kind == "down" else (F, H)
                if spec.shape != want or spec.dtype != gate.dtype:
                    raise CheckpointFormatError(
                        f"{self._hf_key(prefix, e, {v: k for k, v in names.items()}[kind])!r}: "
                        f"shape {list(spec.shape)} {spec.dtype}, expected {list(want)} {gate.dtype} "
                        f"like the other experts"
                    )
            shapes = {
                "transformers": ((E, 2 * F, H), (E, H, F)),
                "mindspeed": ((E, H, 2 * F), (E, F, H)),
                "flat": ((E * H, 2 * F), (E * F, H)),
            }[self.style]
            for merged, shape in zip(self.merged_keys(prefix), shapes):
                out[merged] = TensorSpec(merged, gate.dtype, shape)
            for e in range(E):
                for name in names:
                    del specs[self._hf_key(prefix, e, name)]
        return out

    def check_merged(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Before splitting the merged tensors among HF-named ``shapes``: every MLP of the
        layer range has its pair, every pair has one E, F and H. The number of pairs."""
        pattern = re.compile(
            rf"(?P<p>.+)\.{re.escape(self.container)}\.(?:{re.escape(self.gate_up)}|"
            rf"{re.escape(self.down)})"
        )
        found = {m.group("p") for k in shapes if (m := pattern.fullmatch(k)) and self._owns(m.group("p"))}
        for prefix in sorted(found | set(self.layer_mlps())):
            gate_up, down = self.merged_keys(prefix)
            for key in (gate_up, down):
                if key not in shapes:
                    raise CheckpointFormatError(f"merged expert tensor {key!r} is missing from the checkpoint")
            E, rows, cols = self._dims(gate_up, shapes[gate_up])  # noqa: N806 - (E, 2F, H)
            E_down, H, F = self._dims(down, shapes[down])  # noqa: N806
            if (E_down, H, 2 * F) != (E, cols, rows):
                raise CheckpointFormatError(
                    f"{gate_up!r} {list(shapes[gate_up])} and {down!r} {list(shapes[down])} do not "
                    f"agree on the number of experts, hidden and FFN sizes in the {self.style!r} form"
                )
        return len(found)


def infer_style(specs, gate_up: str = "gate_up_proj", down: str = "down_proj") -> str | None:
    """The style of merged experts from the shapes of a layer's gate_up and down tensors (the
    styles cannot be confused: see the module doc), or None without merged tensors."""
    shapes = {s.key: s.shape for s in specs.values()}
    for key, gu in shapes.items():
        if not key.endswith("." + gate_up):
            continue
        dn = shapes.get(key[: -len(gate_up)] + down)
        if dn is None or len(gu) != len(dn):
            continue
        if len(gu) == 2:
            return "flat"
        if len(gu) == 3 and gu[1] == 2 * dn[2] and gu[2] == dn[1]:
            return "transformers"
        if len(gu) == 3 and gu[2] == 2 * dn[1] and gu[1] == dn[2]:
            return "mindspeed"
    return None
