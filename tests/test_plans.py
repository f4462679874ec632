"""Compact save plans: key-set codes, the coordinator's merge (coverage, replicas, errors), and
plan sizes that do not grow with tensors x ranks. Simulated ranks in one process (meta tensors,
the real planner and writer), so hundreds of ranks are cheap."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_hf import StateDictMismatchError, TensorBox
from dcp_hf.contract.keysets import decode_keys, encode_keys
from testkit.simulate import simulate_save_plans

KEY_PART = st.one_of(
    st.sampled_from(["model", "layers", "mlp", "experts", "w", "", "."]),
    st.integers(0, 300).map(str),
    st.sampled_from(["007", "0", "00", "#", "a1b2"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(KEY_PART, max_size=7).map("".join), max_size=40))
def test_key_codes_round_trip(keys):
    assert sorted(decode_keys(encode_keys(keys))) == sorted(set(keys))


def test_key_code_of_a_product_is_one_entry():
    keys = [f"model.layers.{i}.mlp.experts.{e}.up_proj.weight" for i in range(3, 61) for e in range(256)]
    code = encode_keys(keys)
    assert len(pickle.dumps(code)) < 200
    assert sorted(decode_keys(code)) == sorted(keys)


def box(shape, offsets, sizes, dtype=torch.bfloat16) -> TensorBox:
    return TensorBox(torch.empty(sizes, dtype=dtype, device="meta"), offsets, shape)


def shard0(shape, rank, world):
    """FSDP2's Shard(0) chunk (torch.chunk sizes), or None where the rank holds no rows."""
    c = -(-shape[0] // world)
    lo, hi = min(rank * c, shape[0]), min((rank + 1) * c, shape[0])
    if hi <= lo:
        return None
    return box(shape, (lo,) + (0,) * (len(shape) - 1), (hi - lo,) + tuple(shape[1:]))


def written(sim, world):
    """Every (key, offsets, sizes) written, by rank; each element must be written once."""
    return {
        r: [
            (i.index.fqn, tuple(i.tensor_data.chunk.offsets), tuple(i.tensor_data.chunk.sizes))
            for i in sim.final_items(r)
        ]
        for r in range(world)
    }


def assert_written_once(out, shapes):
    elements = {k: 0 for k in shapes}
    seen = set()
    for items in out.values():
        for key, offsets, sizes in items:
            assert (key, offsets) not in seen, f"{key} at {offsets} written twice"
            seen.add((key, offsets))
            elements[key] += math.prod(sizes)
    assert elements == {k: math.prod(s) for k, s in shapes.items()}


def test_fsdp_plans_stay_small_and_cover_every_tensor(tmp_path):
    world = 64
    shapes = {
        f"model.layers.{i}.mlp.experts.{e}.{p}.weight": ((96, 16) if p != "down_proj" else (16, 96))
        for i in range(4)
        for e in range(64)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    shapes["model.embed_tokens.weight"] = (1000, 16)
    shapes["model.norm.weight"] = (16,)  # fewer rows than ranks: ranks 16.. hold none
    states = [{k: b for k, s in shapes.items() if (b := shard0(s, r, world)) is not None} for r in range(world)]
    sim = simulate_save_plans(states, str(tmp_path / "out"), keep_planners=True)
    # 770 tensors x 64 ranks, but each rank sends a few blocks and gets a few hundred bytes back.
    assert max(len(pickle.dumps(p)) for p in sim.local_plans) < 3000
    assert max(len(pickle.dumps(p)) for p in sim.global_plans) < 3000
    out = written(sim, world)
    assert_written_once(out, shapes)
    assert all(len(items) == sum(1 for k in shapes if shard0(shapes[k], r, world)) for r, items in out.items())


def test_replicas_share_the_writing(tmp_path):
    """Every rank holds every tensor whole (DDP): each tensor is written once, and the writing
    is spread over the replicas."""
    shapes = {f"layers.{i}.w": (8, 4) for i in range(12)}
    states = [{k: box(s, (0, 0), s) for k, s in shapes.items()} for _ in range(4)]
    sim = simulate_save_plans(states, str(tmp_path / "out"), keep_planners=True)
    out = written(sim, 4)
    assert_written_once(out, shapes)
    assert sorted(len(v) for v in out.values()) == [3, 3, 3, 3]


def test_hybrid_shards_and_replicas(tmp_path):
    """2 replicas x 4 shards (HSDP): each box once, each replica writes half the boxes."""
    shapes = {f"layers.{i}.w": (8, 4) for i in range(6)}
    states = [{k: shard0(s, r % 4, 4) for k, s in shapes.items()} for r in range(8)]
    sim = simulate_save_plans(states, str(tmp_path / "out"), keep_planners=True)
    out = written(sim, 8)
    assert_written_once(out, shapes)
    assert sum(1 for v in out.values() if v) == 8


def test_overlapping_key_sets_of_replicas(tmp_path):
    """Ranks holding different but overlapping sets of whole tensors: each written once."""
    shapes = {f"t.{i}": (3,) for i in range(9)}
    states = [
        {f"t.{i}": box((3,), (0,), (3,)) for i in range(0, 6)},
        {f"t.{i}": box((3,), (0,), (3,)) for i in range(3, 9)},
        {f"t.{i}": box((3,), (0,), (3,)) for i in range(2, 5)},
    ]
    sim = simulate_save_plans(states, str(tmp_path / "out"), keep_planners=True)
    assert_written_once(written(sim, 3), shapes)


@pytest.mark.parametrize(
    "states, message",
    [
        ([{"w": box((4, 2), (0, 0), (2, 2))}, {"w": box((4, 2), (1, 0), (3, 2))}], "overlaps chunk"),
        ([{"w": box((4, 2), (0, 0), (2, 2))}, {"v": box((4, 2), (0, 0), (4, 2))}], "cover 4 of 8 elements"),
        ([{"w": box((4, 2), (0, 0), (4, 2))}, {"w": box((4, 3), (0, 0), (4, 3))}], "ranks disagree on the tensor"),
        (
            [{"w": box((4,), (0,), (4,), torch.float32)}, {"w": box((4,), (0,), (4,))}],
            "rank 0 has shape [4] torch.float32",
        ),
    ],
)
def test_bad_chunks_name_the_key(tmp_path, states, message):
    with pytest.raises(StateDictMismatchError, match="'w'") as info:
        simulate_save_plans(states, str(tmp_path / "out"))
    assert message in str(info.value)


def test_replicas_from_different_tensors_fail(tmp_path):
    """Two ranks save one HF box from different in-memory tensors (a layout that renames
    differently on each rank would do that): an error, not one of them silently kept."""
    from dcp_hf import Layout
    from dcp_hf.layouts import Rename

    states = [{"a.w": box((2,), (0,), (2,))}, {"b.w": box((2,), (0,), (2,))}]
    layout = Layout(renames=(Rename("a.", "x."), Rename("b.", "x.")))
    with pytest.raises(StateDictMismatchError, match="from different in-memory tensors"):
        simulate_save_plans(states, str(tmp_path / "out"), layout)


def test_load_plans_stay_small_and_unloaded_keys_are_found(tmp_path):
    """With HFStorageReader a rank sends the coordinator only the code of the keys it loads (its
    read items stay with it); the check that every tensor is loaded by some rank still holds."""
    from safetensors.torch import save_file

    from dcp_hf import HFLoadPlanner, HFStorageReader

    world = 32
    shapes = {f"model.layers.{i}.mlp.experts.{e}.w": (64, 8) for i in range(4) for e in range(32)}
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    metadata = HFStorageReader(str(tmp_path)).read_metadata()

    def plans(keys):
        out = []
        for rank in range(world):
            planner = HFLoadPlanner()
            state = {k: box(shapes[k], (2 * rank, 0), (2, 8), torch.float32) for k in keys}
            planner.set_up_planner(state, metadata, rank == 0)
            out.append((planner, planner.create_local_plan()))
        return out

    ranks = plans(shapes)
    assert max(len(pickle.dumps(p)) for _, p in ranks) < 600
    central = ranks[0][0].create_global_plan([p for _, p in ranks])
    items = ranks[5][0].finish_plan(central[5]).items
    assert len(items) == len(shapes) and {tuple(i.storage_offsets) for i in items} == {(10, 0)}
    partial = plans([k for k in shapes if ".experts.31." not in k])
    with pytest.raises(StateDictMismatchError, match="4 tensor.s. of the checkpoint are loaded by no rank"):
        partial[0][0].create_global_plan([p for _, p in partial])
