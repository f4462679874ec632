"""Quantized checkpoints (FP8 block-scaled, MXFP4) load dequantized into any sharding.

Oracles: plain-torch block-by-block dequantization (tests/quant_workers.py), transformers'
own MXFP4 dequantization, and torch's QuantizedHuggingFaceStorageReader."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.quantized_hf_storage import (
    QuantizedHuggingFaceStorageReader,
)

from dcp_hf import HFLoadPlanner, HFStorageReader, Layout, TensorBox, detect_layout
from dcp_hf.layouts.quantized import MXFP4, BlockFP8
from dcp_hf.local_ranks import run_ranks
from tests.quant_workers import (
    DSV3_QUANTIZED,
    FP8,
    FP8_CONFIG,
    dequantize_fp8,
    load_sharded,
    quantize_fp8,
    write_checkpoint,
)


def _bits(t):
    return t.contiguous().view(torch.uint8)


class _Recording(HFLoadPlanner):
    """Records each read: (HF key, offsets, sizes)."""

    def resolve_tensor(self, read_item):
        self.reads.append((read_item.storage_index.fqn, tuple(read_item.storage_offsets), tuple(read_item.lengths)))
        return super().resolve_tensor(read_item)


def _load(sd, path, layout=None, **kwargs):
    """Load with our reader and planner in this process; returns the reads made."""
    planner = _Recording(layout or detect_layout(path), **kwargs)
    planner.reads = []
    dcp.load(sd, storage_reader=HFStorageReader(path), planner=planner, no_dist=True)
    return sorted(planner.reads)


# -- FP8 block-scaled ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """A 300x200 fp8 weight (partial edge blocks on both dims) whose scales sit in another
    file, a plain tensor beside it."""
    path = str(tmp_path_factory.mktemp("fp8"))
    g = torch.Generator().manual_seed(0)
    w, s = quantize_fp8(torch.randn(300, 200, generator=g) * 3)
    norm = torch.randn(200, generator=g).to(torch.bfloat16)
    write_checkpoint(
        path,
        {
            "model-00001-of-00002.safetensors": {"a.weight": w, "a.norm": norm},
            "model-00002-of-00002.safetensors": {"a.weight_scale_inv": s},
        },
        {"model_type": "llama", "quantization_config": FP8_CONFIG},
    )
    return path, w, s, norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fp8_whole_equals_reference_and_torch_reader(fp8_ckpt, dtype):
    path, w, s, norm = fp8_ckpt
    sd = {"a.weight": torch.zeros(300, 200, dtype=dtype), "a.norm": torch.zeros(200, dtype=torch.bfloat16)}
    _load(sd, path)
    assert torch.equal(_bits(sd["a.weight"]), _bits(dequantize_fp8(w, s, dtype)))
    assert torch.equal(sd["a.norm"], norm)
    theirs = {"a.weight": torch.zeros(300, 200, dtype=dtype)}
    dcp.load(theirs, storage_reader=QuantizedHuggingFaceStorageReader(path, target_dtype=dtype), no_dist=True)
    assert torch.equal(_bits(sd["a.weight"]), _bits(theirs["a.weight"]))


@pytest.mark.parametrize(
    "offsets,sizes",
    [
        ((0, 0), (128, 200)),  # block-aligned rows
        ((100, 0), (60, 200)),  # rows across a block edge
        ((0, 150), (300, 50)),  # a column shard inside the partial edge block
        ((130, 70), (170, 70)),  # both dims unaligned, up to the edges
        ((299, 199), (1, 1)),  # one element of the last partial block
    ],
)
def test_fp8_box_reads_only_its_rows_columns_and_scale_blocks(fp8_ckpt, offsets, sizes):
    path, w, s, _ = fp8_ckpt
    local = torch.full(sizes, float("nan"), dtype=torch.bfloat16)
    reads = _load({"a.weight": TensorBox(local, offsets, (300, 200))}, path, allow_unexpected=["a.norm"])
    (r, c), (n, m) = offsets, sizes
    want = dequantize_fp8(w, s, torch.bfloat16)[r : r + n, c : c + m]
    assert torch.equal(_bits(local), _bits(want))
    # Exactly the weight box and the scale blocks that cover it.
    blocks = ((r // 128, c // 128), ((r + n - 1) // 128 - r // 128 + 1, (c + m - 1) // 128 - c // 128 + 1))
    assert reads == [("a.weight", offsets, sizes), ("a.weight_scale_inv", *blocks)]


def test_fp8_transposed_destination_and_hand_built_layout(tmp_path, fp8_ckpt):
    """A layout built by hand (no config.json); the destination is a view of another tensor."""
    path, w, s, _ = fp8_ckpt
    (tmp_path / "x").mkdir()
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ):
        (tmp_path / "x" / name).write_bytes(open(f"{path}/{name}", "rb").read())
    base = torch.zeros(200, 300, dtype=torch.float32)
    sd = {"a.weight": base.t()}
    _load(sd, str(tmp_path / "x"), Layout(quantization=BlockFP8()), allow_unexpected=["a.norm"])
    assert torch.equal(base.t(), dequantize_fp8(w, s, torch.float32))


def test_fp8_raw_destination_and_layout_specs(fp8_ckpt):
    """An fp8 destination gets the stored values as they are; memory_specs shows the logical tensor."""
    path, w, s, norm = fp8_ckpt
    sd = {
        "a.weight": torch.zeros(300, 200, dtype=FP8),
        "a.weight_scale_inv": torch.zeros(3, 2),
        "a.norm": torch.zeros(200, dtype=torch.bfloat16),
    }
    _load(sd, path)
    assert torch.equal(_bits(sd["a.weight"]), _bits(w)) and torch.equal(sd["a.weight_scale_inv"], s)
    from dcp_hf.format import TensorSpec

    specs, _ = detect_layout(path).memory_specs(
        {
            "a.weight": TensorSpec("a.weight", FP8, (300, 200)),
            "a.weight_scale_inv": TensorSpec("a.weight_scale_inv", torch.float32, (3, 2)),
            "a.norm": TensorSpec("a.norm", torch.bfloat16, (200,)),
        }
    )
    assert specs == {
        "a.weight": TensorSpec("a.weight", torch.bfloat16, (300, 200)),
        "a.norm": TensorSpec("a.norm", torch.bfloat16, (200,)),
    }


def test_fp8_errors(tmp_path):
    g = torch.Generator().manual_seed(1)
    w, s = quantize_fp8(torch.randn(130, 64, generator=g))
    write_checkpoint(
        str(tmp_path / "noscale"), {"model.safetensors": {"a.weight": w}}, {"quantization_config": FP8_CONFIG}
    )
    with pytest.raises(CheckpointException, match="'a.weight'.*no 'a.weight_scale_inv'"):
        _load({"a.weight": torch.zeros(130, 64)}, str(tmp_path / "noscale"))
    write_checkpoint(
        str(tmp_path / "badscale"),
        {"model.safetensors": {"a.weight": w, "a.weight_scale_inv": s[:1]}},
        {"quantization_config": FP8_CONFIG},
    )
    with pytest.raises(CheckpointException, match="'a.weight_scale_inv' has shape \\[1, 1\\]"):
        _load({"a.weight": torch.zeros(130, 64)}, str(tmp_path / "badscale"))
    write_checkpoint(
        str(tmp_path / "good"),
        {"model.safetensors": {"a.weight": w, "a.weight_scale_inv": s}},
        {"quantization_config": FP8_CONFIG},
    )
    with pytest.raises(CheckpointException, match="'a.weight' is quantized.*not torch.int32"):
        _load({"a.weight": torch.zeros(130, 64, dtype=torch.int32)}, str(tmp_path / "good"))
    with pytest.raises(CheckpointException, match="'a.weight'.*shape \\[130, 64\\].*\\[64, 130\\]"):
        _load({"a.weight": torch.zeros(64, 130)}, str(tmp_path / "good"))
    # Without the quantization in the layout, even a reader that casts refuses (no silent cast).
    with pytest.raises(CheckpointException, match="'a.weight' is torch.float8_e4m3fn with block scales"):
        dcp.load(
            {"a.weight": torch.zeros(130, 64)},
            storage_reader=HFStorageReader(str(tmp_path / "good"), allow_dtype_cast=True),
            planner=HFLoadPlanner(),
            no_dist=True,
        )
    (tmp_path / "awq").mkdir()
    (tmp_path / "awq" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        detect_layout(str(tmp_path / "awq"))


# -- MXFP4 (GPT-OSS) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4_ckpt(tmp_path_factory):
    """GPT-OSS-shaped experts: gate_up blocks [E, 2F, H/32, 16], down blocks [E, H, F/32, 16]."""
    path = str(tmp_path_factory.mktemp("mxfp4"))
    g = torch.Generator().manual_seed(2)
    E, F, H = 3, 64, 96
    t = {}
    for name, rows, cols in (("gate_up_proj", 2 * F, H), ("down_proj", H, F)):
        t[f"model.layers.0.mlp.experts.{name}_blocks"] = torch.randint(
            0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=g
        )
        t[f"model.layers.0.mlp.experts.{name}_scales"] = torch.randint(
            118, 136, (E, rows, cols // 32), dtype=torch.uint8, generator=g
        )
        t[f"model.layers.0.mlp.experts.{name}_bias"] = torch.randn(E, rows, generator=g)
    blocks = {k: v for k, v in t.items() if not k.endswith("_scales")}
    scales = {k: v for k, v in t.items() if k.endswith("_scales")}
    write_checkpoint(
        path,
        {"model-00001-of-00002.safetensors": blocks, "model-00002-of-00002.safetensors": scales},
        {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}},
    )
    return path, t


def _transformers_dequant(t, name, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    p = f"model.layers.0.mlp.experts.{name}"
    return convert_moe_packed_tensors(t[p + "_blocks"], t[p + "_scales"], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_gpt_oss_equals_transformers(mxfp4_ckpt, dtype):
    """detect_layout of a GPT-OSS release: transformers' experts [E, H, 2F] / [E, F, H]."""
    path, t = mxfp4_ckpt
    p = "model.layers.0.mlp.experts."
    sd = {
        p + "gate_up_proj": torch.zeros(3, 96, 128, dtype=dtype),
        p + "down_proj": torch.zeros(3, 64, 96, dtype=dtype),
        p + "gate_up_proj_bias": torch.zeros(3, 128),
        p + "down_proj_bias": torch.zeros(3, 96),
    }
    _load(sd, path)
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(_bits(sd[p + name]), _bits(_transformers_dequant(t, name, dtype))), name
    assert torch.equal(sd[p + "down_proj_bias"], t[p + "down_proj_bias"])


@pytest.mark.parametrize(
    "offsets,sizes", [((1, 0, 0), (1, 96, 128)), ((0, 20, 7), (3, 50, 60)), ((2, 95, 127), (1, 1, 1))]
)
def test_mxfp4_boxes_read_only_their_groups(mxfp4_ckpt, offsets, sizes):
    path, t = mxfp4_ckpt
    p = "model.layers.0.mlp.experts.gate_up_proj"
    local = torch.zeros(sizes, dtype=torch.bfloat16)
    reads = _load({p: TensorBox(local, offsets, (3, 96, 128))}, path, allow_unexpected=True)
    want = _transformers_dequant(t, "gate_up_proj", torch.bfloat16)
    assert torch.equal(_bits(local), _bits(want[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]))
    # In memory dim 1 is H, the grouped dim on disk (last): only the groups of 32 it touches.
    (e, h, r), (ne, nh, nr) = offsets, sizes
    g0, ng = h // 32, (h + nh - 1) // 32 - h // 32 + 1
    assert reads == [(p + "_blocks", (e, r, g0, 0), (ne, nr, ng, 16)), (p + "_scales", (e, r, g0), (ne, nr, ng))]


def test_mxfp4_stored_orientation_equals_torch_reader(mxfp4_ckpt):
    """A hand-built layout keeps the stored orientation [E, 2F, H]. torch 2.13's reader (which
    names it ``*_blocks``) fills only the first G values of each row (its chunk metadata keeps
    the blocks' 4-D shape); where it writes, its values must equal ours."""
    path, t = mxfp4_ckpt
    p = "model.layers.0.mlp.experts."
    ours = {p + "gate_up_proj": torch.zeros(3, 128, 96, dtype=torch.bfloat16)}
    _load(ours, path, Layout(quantization=MXFP4()), allow_unexpected=True)
    assert torch.equal(
        _bits(ours[p + "gate_up_proj"].transpose(1, 2)), _bits(_transformers_dequant(t, "gate_up_proj", torch.bfloat16))
    )
    theirs = {p + "gate_up_proj_blocks": torch.full((3, 128, 96), float("nan"), dtype=torch.bfloat16)}
    dcp.load(theirs, storage_reader=QuantizedHuggingFaceStorageReader(path, target_dtype=torch.bfloat16), no_dist=True)
    written = ~theirs[p + "gate_up_proj_blocks"].isnan()
    assert written.any()
    assert torch.equal(_bits(ours[p + "gate_up_proj"][written]), _bits(theirs[p + "gate_up_proj_blocks"][written]))


# -- DeepSeek-V3-shaped release, multi-process -------------------------------------------------


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    """A tiny DeepSeek-V3 (transformers model, random weights) released as DeepSeek does: fp8
    linear weights + float32 weight_scale_inv, per-expert keys, scales in their own file,
    quantization_config. Returns the path and the reference: the in-memory (fused experts)
    tensors dequantized block by block, and the shapes of the fp8 HF weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    root = tmp_path_factory.mktemp("dsv3")
    cfg = DeepseekV3Config(
        vocab_size=100,
        hidden_size=192,
        intermediate_size=320,
        moe_intermediate_size=160,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    memory = {k: v.to(torch.bfloat16) for k, v in DeepseekV3ForCausalLM(cfg).state_dict().items()}
    hf = {}
    for key, v in memory.items():  # transformers' fused experts -> per-expert HF keys
        if key.endswith("experts.gate_up_proj"):
            F = v.shape[1] // 2
            for e in range(v.shape[0]):
                hf[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :F]
                hf[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, F:]
        elif key.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                hf[key.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            hf[key] = v
    files = {
        "model-00001-of-00003.safetensors": {},
        "model-00002-of-00003.safetensors": {},
        "model-00003-of-00003.safetensors": {},
    }
    deq = {}
    for i, (key, v) in enumerate(sorted(hf.items())):
        if DSV3_QUANTIZED.fullmatch(key):
            w, s = quantize_fp8(v)
            files[f"model-0000{1 + i % 2}-of-00003.safetensors"][key] = w
            files["model-00003-of-00003.safetensors"][key + "_scale_inv"] = s
            deq[key] = dequantize_fp8(w, s, torch.bfloat16)
        else:
            files[f"model-0000{1 + i % 2}-of-00003.safetensors"][key] = v.clone()
            deq[key] = v
    config = cfg.to_dict() | {"quantization_config": FP8_CONFIG}
    write_checkpoint(str(root / "ckpt"), files, json.loads(json.dumps(config, default=str)))
    expected = {}
    for key in memory:
        if key.endswith("experts.gate_up_proj"):
            expected[key] = torch.stack(
                [
                    torch.cat(
                        [
                            deq[key.replace("gate_up_proj", f"{e}.gate_proj.weight")],
                            deq[key.replace("gate_up_proj", f"{e}.up_proj.weight")],
                        ]
                    )
                    for e in range(4)
                ]
            )
        elif key.endswith("experts.down_proj"):
            expected[key] = torch.stack([deq[key.replace("down_proj", f"{e}.down_proj.weight")] for e in range(4)])
        else:
            expected[key] = deq[key]
    assert len([k for k in hf if DSV3_QUANTIZED.fullmatch(k)]) == 2 * 5 + 3 + 3 + 3 * 4
    hf_fp8 = {k: tuple(hf[k].shape) for k in hf if DSV3_QUANTIZED.fullmatch(k)}
    torch.save({"memory": expected, "hf_fp8": hf_fp8}, str(root / "expected.pt"))
    return str(root / "ckpt"), str(root / "expected.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world,kinds", [(2, ["shard0", "shard1"]), (4, ["2d"])])
def test_dsv3_fp8_release_into_fsdp2_shards(dsv3, world, kinds):
    """Every rank's shard of every tensor equals the block-wise reference; the fp8 weights equal
    torch's QuantizedHuggingFaceStorageReader on the same shards."""
    path, expected = dsv3
    bad = run_ranks(load_sharded, world, path, expected, kinds, timeout=240)
    assert bad == [[]] * world


# -- Save quantized ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_fp8(tmp_path_factory):
    """save_state saved quantized on 2 ranks, Shard(0) and Shard(1): rows 0-149 / 150-299 and
    columns 0-99 / 100-199 split blocks between the ranks."""
    from tests.quant_workers import save_quantized

    root = tmp_path_factory.mktemp("saved")
    run_ranks(save_quantized, 2, str(root), ["shard0", "shard1"], timeout=240)
    return root


@pytest.mark.parametrize("kind", ["shard0", "shard1"])
def test_save_fp8_equals_blockwise_reference_and_round_trips(saved_fp8, kind):
    """A block split over ranks gets one scale from all holders; the files equal the
    block-by-block quantization, and a load gives its dequantization."""
    from safetensors.torch import load_file

    from tests.quant_workers import save_state

    path = saved_fp8 / kind
    stored = {}
    for f in sorted(path.glob("*.safetensors")):
        stored.update(load_file(str(f)))
    state = save_state()
    quantized = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert sorted(stored) == sorted(list(state) + [k + "_scale_inv" for k in quantized])
    for key in quantized:
        w, s = quantize_fp8(state[key])
        assert torch.equal(_bits(stored[key]), _bits(w)) and torch.equal(stored[key + "_scale_inv"], s), key
    for key in ("model.layers.0.mlp.gate.weight", "model.norm.weight"):
        assert torch.equal(stored[key], state[key])
    assert json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    back = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    _load(back, str(path))
    for key in quantized:
        w, s = quantize_fp8(state[key])
        assert torch.equal(_bits(back[key]), _bits(dequantize_fp8(w, s, state[key].dtype))), key


# -- inspect, convert --------------------------------------------------------------------------


def test_inspect_shows_logical_tensors(fp8_ckpt, mxfp4_ckpt):
    from dcp_hf.inspect import inspect_checkpoint

    text = inspect_checkpoint(fp8_ckpt[0], verbose=True)
    assert "quantized: 1 tensors load dequantized" in text and "  a.weight  BF16  [300, 200]" in text
    text = inspect_checkpoint(mxfp4_ckpt[0], verbose=True)
    assert "  model.layers.0.mlp.experts.gate_up_proj  BF16  [3, 128, 96]" in text


@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_convert_dequantize(tmp_path, fp8_ckpt, mxfp4_ckpt, which):
    """A quantized release -> a bf16 checkpoint with the HF keys (GPT-OSS experts in
    transformers' orientation), config.json without quantization_config."""
    from safetensors.torch import load_file

    from dcp_hf.cli import main
    from dcp_hf.convert import dequantize

    src = fp8_ckpt[0] if which == "fp8" else mxfp4_ckpt[0]
    if which == "fp8":  # through the command line
        assert main(["convert", "--to", "dequantized", src, str(tmp_path / "out"), "--quiet"]) == 0
        info = {"dequantized": 1}
    else:
        info = dequantize(src, str(tmp_path / "out"))
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(str(f)))
    if which == "fp8":
        _, w, s, norm = fp8_ckpt
        assert sorted(out) == ["a.norm", "a.weight"] and info["dequantized"] == 1
        assert torch.equal(_bits(out["a.weight"]), _bits(dequantize_fp8(w, s, torch.bfloat16)))
    else:
        _, t = mxfp4_ckpt
        p = "model.layers.0.mlp.experts."
        assert sorted(out) == sorted(
            p + n for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        )
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(_bits(out[p + name]), _bits(_transformers_dequant(t, name, torch.bfloat16)))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"


@pytest.mark.slow
def test_dsv3_fp8_release_into_megatron_tp2_ep2(tmp_path):
    """A DeepSeek-V3 Megatron-core model (MLA, shared + routed experts) at TP2/EP2 on 4 ranks:
    the FP8 release loads into its fp32 parameters exactly as the float32 block-wise
    dequantization of the same release (a plain checkpoint) does."""
    pytest.importorskip("megatron.core")
    from safetensors.torch import load_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tests.quant_workers import megatron_load

    cfg = DeepseekV3Config(
        vocab_size=64,
        hidden_size=160,
        intermediate_size=192,
        moe_intermediate_size=144,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=96,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(3)
    DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    source = {}
    for f in (tmp_path / "bf16").glob("*.safetensors"):
        source.update(load_file(str(f)))
    fp8, reference = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}, {}
    for key, v in source.items():
        if DSV3_QUANTIZED.fullmatch(key):
            w, s = quantize_fp8(v)
            fp8["model-00001-of-00002.safetensors"][key] = w
            fp8["model-00002-of-00002.safetensors"][key + "_scale_inv"] = s  # scales in their own file
            reference[key] = dequantize_fp8(w, s, torch.float32)
        else:
            fp8["model-00001-of-00002.safetensors"][key] = reference[key] = v.clone()
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    write_checkpoint(str(tmp_path / "ref"), {"model.safetensors": reference}, config)
    write_checkpoint(str(tmp_path / "fp8"), fp8, config | {"quantization_config": FP8_CONFIG})
    assert len(fp8["model-00002-of-00002.safetensors"]) == 2 * 5 + 3 + 3 + 3 * 4
    bad = run_ranks(megatron_load, 4, str(tmp_path / "fp8"), str(tmp_path / "ref"), timeout=600, daemon=False)
    assert bad == [[]] * 4


def test_export_dtype_keeps_block_scales_in_float32(tmp_path):
    """An export dtype (fp32 training state -> bf16) casts the weights but not the float32
    block scales beside them: a bf16 scale would dequantize to other values."""
    from safetensors import safe_open

    from dcp_hf import HFSavePlanner, HFStorageWriter

    state = {"layer.weight": torch.randn(4, 4), "layer.weight_scale_inv": torch.rand(1, 1) + 0.5}
    dcp.save(
        state, storage_writer=HFStorageWriter(tmp_path, dtype=torch.bfloat16), planner=HFSavePlanner(), no_dist=True
    )
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_slice("layer.weight").get_dtype() == "BF16"
        assert f.get_slice("layer.weight_scale_inv").get_dtype() == "F32"
