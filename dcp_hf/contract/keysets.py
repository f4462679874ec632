"""Compact, exact encoding of a set of tensor keys, for plan messages at scale.

Checkpoint keys are a few templates with numbers in them (``model.layers.#.mlp.experts.#.
up_proj.weight``). A key set is stored as, per template, the set of its number tuples as a trie
whose consecutive values with equal subtrees are merged into ranges, so "layers 3..60 x experts
0..255" is one entry however many keys it stands for. Encoding and decoding are exact: any
string round-trips (numbers with leading zeros are split into single digits).
"""

from __future__ import annotations

import re
from typing import Iterable

_NUMBER = re.compile(r"(0|[1-9][0-9]*)")

# A trie over the remaining numbers of a tuple: () at a leaf, else ((start, stop, child), ...)
# with start <= value < stop sharing the subtree ``child``.
Trie = tuple
KeyCode = tuple  # ((literal parts of the template, trie), ...), sorted by template


def _split(key: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    parts = _NUMBER.split(key)
    return tuple(parts[0::2]), tuple(int(n) for n in parts[1::2])


def _trie(numbers: list[tuple[int, ...]], depth: int) -> Trie:
    if not numbers or depth == len(numbers[0]):
        return ()
    by_value: dict[int, list[tuple[int, ...]]] = {}
    for n in numbers:
        by_value.setdefault(n[depth], []).append(n)
    out: list[list] = []
    for value in sorted(by_value):
        child = _trie(by_value[value], depth + 1)
        if out and out[-1][1] == value and out[-1][2] == child:
            out[-1][1] = value + 1
        else:
            out.append([value, value + 1, child])
    return tuple((a, b, c) for a, b, c in out)


def encode_keys(keys: Iterable[str]) -> KeyCode:
    """The code of a set of keys (order and duplicates do not matter)."""
    by_template: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
    for key in keys:
        template, numbers = _split(key)
        by_template.setdefault(template, set()).add(numbers)
    return tuple((template, _trie(sorted(numbers), 0)) for template, numbers in sorted(by_template.items()))


def _expand(trie: Trie) -> list[tuple[int, ...]]:
    if not trie:
        return [()]
    out = []
    for start, stop, child in trie:
        rest = _expand(child)
        out += [(v,) + r for v in range(start, stop) for r in rest]
    return out


def decode_keys(code: KeyCode) -> list[str]:
    """The keys of a code (in no particular order)."""
    out = []
    for template, trie in code:
        for numbers in _expand(trie):
            parts = [template[0]]
            for n, literal in zip(numbers, template[1:]):
                parts += [str(n), literal]
            out.append("".join(parts))
    return out
