"""The safetensors format layer: headers, index, naming, byte runs, coverage."""

import itertools
import json
import math
import struct

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_hf.boxes import RunGrid, box_runs, check_exact_cover
from dcp_hf.errors import CheckpointFormatError, StateDictMismatchError
from dcp_hf.format import TensorSpec, decode_index, encode_header, layout_files, parse_size, read_header
from dcp_hf.format.header import MAX_HEADER_SIZE
from tests.strategies import shape_and_box


def _file(header: dict | bytes, data: bytes = b"", raw_len: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if raw_len is None else raw_len
    return struct.pack("<Q", n) + body + data


def _parse(blob: bytes):
    return read_header(lambda off, n: blob[off : off + n], "ckpt/model.safetensors", len(blob))


def test_header_round_trip_is_padded_and_tagged():
    blob = encode_header([("b", torch.bfloat16, (2, 3), 0, 12), ("a", torch.int64, (), 12, 20)])
    assert (len(blob) - 8) % 8 == 0
    header = _parse(blob + bytes(20))
    assert header.metadata == {"format": "pt"}
    assert header.tensors["b"].shape == (2, 3) and header.tensors["b"].dtype == torch.bfloat16
    assert header.tensors["a"].start == len(blob) + 12


GOOD = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
BAD_FILES = {
    "truncated": (b"\x01\x02", "truncated"),
    "header_too_large": (struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}", "exceeds the safetensors limit"),
    "header_longer_than_file": (_file(GOOD, bytes(8), raw_len=500), "larger than the file"),
    "not_json": (_file(b"{not json", b""), "not valid JSON"),
    "not_object": (_file([1, 2]), "not a JSON object"),
    "metadata_not_strings": (_file({"__metadata__": {"a": 1}}), "must map strings to strings"),
    "unknown_dtype": (
        _file({"x": {"dtype": "F17", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)),
        "unknown safetensors dtype",
    ),
    "negative_shape": (_file({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, bytes(1)), "negative"),
    "bool_shape": (
        _file({"x": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, bytes(1)),
        "must be an integer",
    ),
    "huge_shape": (_file({"x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, bytes(8)), "needs"),
    "offsets_vs_shape": (_file({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), "needs 12"),
    "gap": (_file({"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, bytes(2)), "gap of 1 bytes"),
    "overlap": (
        _file(
            {
                "x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "y": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            bytes(3),
        ),
        "overlaps",
    ),
    "trailing": (_file(GOOD, bytes(9)), "1 trailing bytes"),
    "short_data": (_file(GOOD, bytes(7)), "truncated"),
    "duplicate_key": (
        _file(
            b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            bytes(1),
        ),
        "duplicate key 'x'",
    ),
    "extra_field": (
        _file({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "z": 1}}, bytes(1)),
        "expected exactly",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_header_is_a_clear_error_naming_the_file(case):
    blob, message = BAD_FILES[case]
    with pytest.raises(CheckpointFormatError, match=message) as info:
        _parse(blob)
    assert "ckpt/model.safetensors" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_headers_raise_only_our_error(data):
    blob = struct.pack("<Q", len(data)) + data
    try:
        _parse(blob)
    except CheckpointFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=5),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "U8", "BF16", "XX", 3]),
                "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.none(),
                "data_offsets": st.lists(st.integers(-1, 2**40), max_size=3),
            }
        ),
        max_size=4,
    )
)
def test_fuzzed_structured_headers_raise_only_our_error(header):
    try:
        _parse(_file(header, bytes(64)))
    except CheckpointFormatError:
        pass


@pytest.mark.parametrize("name", ["../x.safetensors", "/abs/x.safetensors", "s3://b/x", "a/b.safetensors", "", "..", 3])
def test_index_rejects_file_names_outside_the_checkpoint(name):
    data = json.dumps({"weight_map": {"k": name}}).encode()
    with pytest.raises(CheckpointFormatError, match="index.json: key 'k'"):
        decode_index(data, "ckpt/model.safetensors.index.json")


@pytest.mark.parametrize("data", [b"[]", b"{", b'{"metadata": {}}', b'{"weight_map": []}'])
def test_index_must_be_an_object_with_a_weight_map(data):
    with pytest.raises(CheckpointFormatError, match="ckpt/model.safetensors.index.json"):
        decode_index(data, "ckpt/model.safetensors.index.json")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size(123) == 123
    for bad in ("5XB", "-1GB", 0, "GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_files_are_grouped_and_named_like_huggingface_hub():
    tensors = {f"layer.{i}.w": torch.empty(100 + 37 * i, dtype=torch.float32) for i in range(12)}
    tensors["big"] = torch.empty(5000, dtype=torch.bfloat16)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    ours = layout_files(specs, 2000)
    hub = split_torch_state_dict_into_shards(tensors, max_shard_size=2000)
    assert {f.name: sorted(f.offsets) for f in ours} == {
        name: sorted(keys) for name, keys in hub.filename_to_tensors.items()
    }
    single = layout_files(specs, 10**9)
    assert [f.name for f in single] == ["model.safetensors"]


def _runs_brute_force(shape, offsets, sizes, itemsize):
    """Byte offsets of the box's elements in C order, merged into (start, length) runs."""
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    starts = [
        sum((o + i) * s for o, i, s in zip(offsets, idx, strides)) * itemsize
        for idx in itertools.product(*(range(n) for n in sizes))
    ]
    runs = []
    for s in starts:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1][1] += itemsize
        else:
            runs.append([s, itemsize])
    return [tuple(r) for r in runs]


def boxes():
    return st.tuples(shape_and_box(), st.sampled_from([1, 2, 4])).map(lambda t: (*t[0], t[1]))


def _flatten(grid: RunGrid):
    runs = []
    for s in grid.starts():
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1][1] += grid.run_len
        else:
            runs.append([s, grid.run_len])
    return [tuple(r) for r in runs]


@settings(max_examples=400, deadline=None)
@given(boxes(), st.integers(1, 64))
def test_box_runs_match_brute_force_and_split_reassembles(box, max_bytes):
    shape, offsets, sizes, width = box
    grid = box_runs(shape, offsets, sizes, width)
    assert _flatten(grid) == _runs_brute_force(shape, offsets, sizes, width)
    pieces = grid.split(max_bytes)
    assert all(g.nbytes <= max_bytes for g, _ in pieces)
    rebuilt = []
    for g, buf_off in pieces:
        for i, s in enumerate(g.starts()):
            rebuilt.append((buf_off + i * g.run_len, s, g.run_len))
    byte_map = sorted((b + k, s + k) for b, s, n in rebuilt for k in range(n))
    expected = [
        (i, s + k)
        for i, (s, k) in enumerate((s, k) for s, n in _runs_brute_force(shape, offsets, sizes, width) for k in range(n))
    ]
    assert byte_map == [(b, s) for b, s in expected]


def test_exact_cover():
    check_exact_cover("w", (4, 4), [((0, 0), (2, 4), "r0"), ((2, 0), (2, 2), "r1"), ((2, 2), (2, 2), "r2")])
    with pytest.raises(StateDictMismatchError, match="'w'.*overlaps"):
        check_exact_cover("w", (4, 4), [((0, 0), (3, 4), "r0"), ((2, 0), (2, 4), "r1")])
    with pytest.raises(StateDictMismatchError, match="cover 12 of 16"):
        check_exact_cover("w", (4, 4), [((0, 0), (3, 4), "r0")])
    with pytest.raises(StateDictMismatchError, match="outside"):
        check_exact_cover("w", (4, 4), [((0, 0), (5, 4), "r0")])
    check_exact_cover("s", (), [((), (), "r0")])
    with pytest.raises(StateDictMismatchError, match="overlaps"):
        check_exact_cover("s", (), [((), (), "r0"), ((), (), "r1")])
