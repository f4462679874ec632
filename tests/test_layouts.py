"""Layouts: merged experts in every style, model placements, and the expert commands."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import (
    HFLoadPlanner,
    HFSavePlanner,
    HFStorageReader,
    HFStorageWriter,
    Layout,
    MergedExperts,
    StateDictMismatchError,
    detect_layout,
)
from dcp_hf.convert import experts
from dcp_hf.errors import CheckpointFormatError
from dcp_hf.format import TensorSpec
from dcp_hf.layouts import mem_view
from tests.moe_models import logits, reference_merge, tiny_moe

transformers = pytest.importorskip("transformers")
STYLES = ["transformers", "mindspeed", "flat"]


def _experts(E=3, F=4, H=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(F, H, generator=g) for _ in range(E)],
        [torch.randn(F, H, generator=g) for _ in range(E)],
        [torch.randn(H, F, generator=g) for _ in range(E)],
    )


@pytest.mark.parametrize("style", STYLES)
def test_pieces_match_the_reference_math(style):
    gate, up, down = _experts()
    gate_up, down_m = reference_merge(gate, up, down, style)
    layout = Layout((MergedExperts(style, num_experts=3),))
    hf = {
        f"l.experts.{e}.{n}.weight": t
        for e in range(3)
        for n, t in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e]))
    }
    for key, merged in (("l.experts.gate_up_proj", gate_up), ("l.experts.down_proj", down_m)):
        pieces = layout.pieces(key, tuple(merged.shape))
        assert len(pieces) == (6 if "gate_up" in key else 3)
        for p in pieces:
            extents = [p.mem_extent(m) for m in range(merged.dim())]
            assert torch.equal(mem_view(merged, p.mem_offsets, extents, p.mem_dims), hf[p.hf_key])
    specs = {k: TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in hf.items()}
    specs["l.norm.weight"] = TensorSpec("l.norm.weight", torch.float32, (6,))
    made, outside = layout.memory_specs(specs)
    assert outside == [] and made["l.norm.weight"].shape == (6,)
    assert made["l.experts.gate_up_proj"].shape == tuple(gate_up.shape)
    assert made["l.experts.down_proj"].shape == tuple(down_m.shape)


def test_missing_expert_and_uncovered_keys_are_errors():
    gate, up, down = _experts()
    specs = {
        f"l.experts.{e}.{n}.weight": TensorSpec(f"l.experts.{e}.{n}.weight", torch.float32, t.shape)
        for e in (0, 2)
        for n, t in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e]))
    }
    with pytest.raises(CheckpointFormatError, match="'l.experts.1.gate_proj.weight' is missing"):
        Layout((MergedExperts(),)).memory_specs(specs)
    with pytest.raises(StateDictMismatchError, match="'x.weight': no rule of layout"):
        Layout((MergedExperts(),), strict=True, name="moe").pieces("x.weight", (2, 2))
    with pytest.raises(StateDictMismatchError, match="need a 3-D tensor"):
        Layout((MergedExperts(),)).pieces("l.experts.gate_up_proj", (4, 4))


def _load(state, path, layout, **kw):
    dcp.load(state, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(layout, **kw), no_dist=True)


def _save(state, path, layout, **kw):
    dcp.save(state, storage_writer=HFStorageWriter(path, **kw), planner=HFSavePlanner(layout), no_dist=True)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_transformers_families_through_fused_experts(tmp_path, model_type):
    source = tiny_moe(model_type, seed=0)
    source.save_pretrained(tmp_path / "hf")  # per-expert keys on disk
    layout = detect_layout(str(tmp_path / "hf"))
    assert layout.rules, layout

    # Per-expert HF -> fused in-memory tensors: what transformers itself builds.
    built = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    model = tiny_moe(model_type, seed=1)
    state = model.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    _load(state, tmp_path / "hf", layout)
    assert state.keys() == built.keys()
    for k in built:
        assert torch.equal(state[k], built[k]), k

    # Fused in-memory -> per-expert HF, loaded by transformers: identical logits.
    _save(model.state_dict(), tmp_path / "ours", layout)
    for name in ("config.json", "generation_config.json"):
        if (tmp_path / "hf" / name).exists():
            (tmp_path / "ours" / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    assert (
        load_file(tmp_path / "ours" / "model.safetensors").keys()
        == load_file(tmp_path / "hf" / "model.safetensors").keys()
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(logits(reloaded), logits(source))

    # split(merge(x)) == x, for every style.
    original = load_file(tmp_path / "hf" / "model.safetensors")
    for style in STYLES:
        experts("merge", str(tmp_path / "hf"), str(tmp_path / f"m-{style}"), style)
        experts("split", str(tmp_path / f"m-{style}"), str(tmp_path / f"s-{style}"))
        again = load_file(tmp_path / f"s-{style}" / "model.safetensors")
        assert again.keys() == original.keys()
        assert all(torch.equal(again[k], original[k]) for k in original), style


def test_qwen3_omni_thinker_prefix_on_disk(tmp_path):
    thinker = tiny_moe("qwen3_omni_moe_thinker")
    thinker.save_pretrained(tmp_path / "thinker")
    # The full Qwen3-Omni checkpoint keeps the thinker under "thinker." next to the talker.
    tensors = {f"thinker.{k}": v for k, v in load_file(tmp_path / "thinker" / "model.safetensors").items()}
    tensors["talker.codec_head.weight"] = torch.randn(4, 4)
    (tmp_path / "omni").mkdir()
    save_file(tensors, tmp_path / "omni" / "model.safetensors")
    text = json.loads((tmp_path / "thinker" / "config.json").read_text())["text_config"]
    (tmp_path / "omni" / "config.json").write_text(
        json.dumps({"model_type": "qwen3_omni_moe", "thinker_config": {"text_config": text}})
    )

    layout = detect_layout(str(tmp_path / "omni"))
    reader = HFStorageReader(tmp_path / "omni")
    from dcp_hf.streaming import hf_specs

    specs, outside = layout.memory_specs(hf_specs(reader))
    # In memory as in MindSpeed-MM's merged checkpoint: "thinker." dropped, the talker's names kept.
    assert outside == [] and "talker.codec_head.weight" in specs
    assert "model.layers.0.mlp.experts.gate_up_proj" in specs and not any(k.startswith("thinker.") for k in specs)
    # A thinker-only model in memory (MindSpeed-MM trains the thinker) loads the full checkpoint.
    state = {k: torch.zeros(s.shape, dtype=s.dtype) for k, s in specs.items() if not k.startswith("talker.")}
    _load(state, tmp_path / "omni", layout, allow_unexpected=["talker.*"])
    e = [
        tensors[f"thinker.model.layers.0.mlp.experts.{i}.{n}_proj.weight"]
        for n in ("gate", "up", "down")
        for i in range(4)
    ]
    ref_gu, ref_down = reference_merge(e[0:4], e[4:8], e[8:12], "mindspeed")  # 3-D, not flattened
    assert torch.equal(state["model.layers.0.mlp.experts.gate_up_proj"], ref_gu)
    assert torch.equal(state["model.layers.0.mlp.experts.down_proj"], ref_down)

    _save(state, tmp_path / "back", layout)
    back = load_file(tmp_path / "back" / "model.safetensors")
    thinker_keys = {k for k in tensors if k.startswith("thinker.")}
    assert back.keys() == thinker_keys and all(torch.equal(back[k], tensors[k]) for k in thinker_keys)

    # The same in-memory state, saved without the prefix in transformers' per-expert form,
    # loads into transformers' thinker with identical logits.
    _save(state, tmp_path / "plain", Layout((MergedExperts("mindspeed", num_experts=4),)))
    (tmp_path / "plain" / "config.json").write_bytes((tmp_path / "thinker" / "config.json").read_bytes())
    reloaded = type(thinker).from_pretrained(tmp_path / "plain").eval()
    assert torch.equal(logits(reloaded), logits(thinker))


def test_loading_a_rule_whose_key_is_missing_names_it(tmp_path):
    source = tiny_moe("qwen3_moe")
    source.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    state = tiny_moe("qwen3_moe", seed=1).state_dict()
    with pytest.raises(
        CheckpointException,
        match=r"'model.layers.1.mlp.experts.2.up_proj.weight \(for "
        r"model.layers.1.mlp.experts.gate_up_proj\)'",
    ):
        _load(state, tmp_path / "hf", detect_layout(str(tmp_path / "hf")))


@pytest.mark.slow
def test_fused_experts_sharded_over_four_ranks(tmp_path):
    from dcp_hf.local_ranks import run_ranks
    from tests.workers import fused_experts_round_trip

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "hf")
    assert run_ranks(fused_experts_round_trip, 4, str(tmp_path / "hf"), str(tmp_path)) == [{}] * 4
    original = load_file(tmp_path / "hf" / "model.safetensors")
    for kind in ("experts", "2d"):
        saved = load_file(tmp_path / kind / "model.safetensors")
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[k], original[k]) for k in original), kind


@pytest.mark.parametrize("style", STYLES)
def test_split_in_stripes_of_any_size_gives_the_experts_back(tmp_path, style):
    """``split`` reads the merged tensors in stripes of whole rows: smaller than one expert's
    rows (each read when first needed), a few experts' rows (read ahead into reused buffers)
    or whole tensors. Whatever the stripe, the merged form is the reference math and
    split(merge(x)) == x bit for bit, x written here."""
    E, F, H, layers = 6, 5, 12, 2  # F odd: the halves of gate_up are not aligned
    g = torch.Generator().manual_seed(7)
    x, weights = {}, {}
    for n in range(layers):
        weights[n] = tuple(
            [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(E)] for shape in ((F, H), (F, H), (H, F))
        )
        for e in range(E):
            for name, t in zip(("gate_proj", "up_proj", "down_proj"), weights[n]):
                x[f"model.layers.{n}.mlp.experts.{e}.{name}.weight"] = t[e]
        x[f"model.layers.{n}.mlp.gate.weight"] = torch.randn(E, H, generator=g)
    (tmp_path / "hf").mkdir()
    save_file(x, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({"model_type": "qwen3_moe", "num_experts": E, "num_hidden_layers": layers})
    )
    experts("merge", str(tmp_path / "hf"), str(tmp_path / "merged"), style)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for n in range(layers):
        gate_up, down = reference_merge(*weights[n], style)
        assert torch.equal(merged[f"model.layers.{n}.mlp.experts.gate_up_proj"], gate_up)
        assert torch.equal(merged[f"model.layers.{n}.mlp.experts.down_proj"], down)
    expert_rows = H * 2 * F * 2  # bytes of one expert's rows of gate_up, in every style
    for stripe_bytes in (1, 2 * expert_rows + 1, 1 << 20):
        out = tmp_path / f"split-{stripe_bytes}"
        experts("split", str(tmp_path / "merged"), str(out), style, stripe_bytes=stripe_bytes)
        again = load_file(out / "model.safetensors")
        assert again.keys() == x.keys()
        for k, want in x.items():
            assert torch.equal(again[k].view(torch.uint8), want.view(torch.uint8)), (stripe_bytes, k)


def test_stripe_reader_reads_each_stripe_once_ahead_within_its_budget_in_any_order():
    """Stripes are read once each, ahead of the takers within the budget (plus the stripes the
    takers read themselves), into a few reused buffers; taken in reverse order they are read
    by the takers (no wait for the read-ahead thread); a failed read raises in its takers."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.distributed.checkpoint.metadata import MetadataIndex

    from dcp_hf.streaming import _Stripe, _StripeReader

    def run(order, fail=None, threads=2):
        stripes = [_Stripe(MetadataIndex("t"), 10 * i, 10 * i + 10, 40, uses=2, pooled=True) for i in range(8)]
        reads, buffers, peak = [], set(), []

        def read(stripe, buffer):
            peak.append(reader.held)
            reads.append(stripe.lo)
            buffers.add(buffer.data_ptr())
            if stripe.lo == fail:
                raise OSError("disk on fire")
            t = torch.empty(0, dtype=torch.int32).set_(buffer, 0, (10,))
            return t.copy_(torch.arange(stripe.lo, stripe.hi, dtype=torch.int32))

        reader = _StripeReader(stripes, read, budget=2 * 40, buffer_bytes=40)

        def use(stripe):
            try:
                return reader.take(stripe).tolist()
            finally:
                if stripe.error is None:
                    reader.release(stripe)

        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(use, stripes[i]) for i in order for _ in range(2)]
            results = []
            for f in futures:
                try:
                    results.append(f.result(timeout=60))
                except OSError as e:
                    results.append(str(e))
        reader.close()
        return results, reads, buffers, max(peak), reader.held

    results, reads, buffers, peak, held = run(range(8))
    assert results == [list(range(10 * i, 10 * i + 10)) for i in range(8) for _ in range(2)]
    assert sorted(reads) == [10 * i for i in range(8)] and held == 0
    assert peak <= 2 * 40 + 2 * 40 and len(buffers) <= 4  # the budget, plus a stripe per taker
    results, reads, *_ = run(range(7, -1, -1), threads=1)
    assert results == [list(range(10 * i, 10 * i + 10)) for i in range(7, -1, -1) for _ in range(2)]
    assert sorted(reads) == [10 * i for i in range(8)]
    results, *_ = run(range(8), fail=30)
    assert results[6:8] == ["disk on fire"] * 2
    assert results[:6] + results[8:] == [list(range(10 * i, 10 * i + 10)) for i in range(8) if i != 3 for _ in range(2)]
