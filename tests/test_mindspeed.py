"""``dcp-hf experts merge|split`` against MindSpeed-MM's ``moe_expert`` (tests/mindspeed_oracle.py):
tiny per-expert checkpoints shaped like InternVL3.5, Qwen3-Omni and GLM-4.5V, config.json as
transformers (or InternVL's remote code) writes it, compared key for key and bit for bit, at one
process and under torchrun with 2 ranks."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from dcp_hf.cli import main as cli
from tests import mindspeed_oracle as mindspeed

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent

# A stand-in for InternVL3.5's remote-code config class (configuration_internvl_chat.py): the
# LLM's config is a Qwen3MoeConfig under ``llm_config``.
INTERNVL_CONFIG_PY = """from transformers import PretrainedConfig, Qwen3MoeConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, template=None, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = vision_config or {}
        self.llm_config = Qwen3MoeConfig(**(llm_config or {}))
        self.template = template
"""
SIDE_FILES = {
    "generation_config.json": '{"do_sample": true}',
    "tokenizer_config.json": '{"model_max_length": 8}',
    "tokenizer.json": '{"version": "1.0"}',
    "chat_template.jinja": "{{ messages }}",
    "preprocessor_config.json": '{"patch_size": 14}',
    "assets/speakers.txt": "chelsie\n",
    "training_args.bin": "not safetensors: MindSpeed-MM copies it",
    ".gitattributes": "*.safetensors filter=lfs\n",
}


@pytest.fixture(autouse=True)
def _remote_code_cache(tmp_path, monkeypatch):
    """AutoConfig copies InternVL's remote code into a module cache: keep it in tmp_path."""
    import transformers.dynamic_module_utils as dm

    monkeypatch.setattr(dm, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


class _Weights:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.tensors = {}

    def add(self, key, *shape, dtype=torch.bfloat16):
        self.tensors[key] = torch.randn(shape, generator=self.g).to(dtype)

    def experts(self, mlp, E, F, H, dtype=torch.bfloat16):  # noqa: N803
        for e in range(E):
            self.add(f"{mlp}.experts.{e}.gate_proj.weight", F, H, dtype=dtype)
            self.add(f"{mlp}.experts.{e}.up_proj.weight", F, H, dtype=dtype)
            self.add(f"{mlp}.experts.{e}.down_proj.weight", H, F, dtype=dtype)


def _write(path: Path, tensors: dict, config: dict | None = None):
    """Two shard files and their index, config.json and the side files."""
    path.mkdir(parents=True, exist_ok=True)  # save_pretrained may have made it
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": 0}, "weight_map": {k: n for n, part in zip(names, halves) for k in part}}
        )
    )
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for name, text in SIDE_FILES.items():
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text(text)


def qwen3_omni(path: Path, talker: bool = True) -> dict:
    E, F, H, layers = 4, 4, 8, 2  # noqa: N806 - gate_up [E, H, 2F] is square: a transpose keeps its shape
    tf = transformers
    tf.Qwen3OmniMoeConfig(
        thinker_config={
            "text_config": {
                "num_hidden_layers": layers,
                "num_experts": E,
                "hidden_size": H,
                "moe_intermediate_size": F,
                "vocab_size": 16,
            }
        },
        enable_audio_output=talker,
        architectures=["Qwen3OmniMoeForConditionalGeneration"],
    ).save_pretrained(path)
    w = _Weights(1)
    w.add("thinker.model.embed_tokens.weight", 16, H)
    for n in range(layers):
        p = f"thinker.model.layers.{n}"
        w.add(f"{p}.input_layernorm.weight", H)
        w.add(f"{p}.self_attn.q_proj.weight", H, H)
        w.add(f"{p}.mlp.gate.weight", E, H)
        w.experts(f"{p}.mlp", E, F, H)
    w.add("thinker.model.norm.weight", H, dtype=torch.float32)
    w.add("thinker.lm_head.weight", 16, H)
    w.add("thinker.audio_tower.proj1.weight", 4, 4)
    w.add("thinker.visual.patch_embed.proj.weight", 4, 3, 2, 2)
    if talker:  # the talker is a MoE model too: MindSpeed-MM leaves its experts alone
        w.experts("talker.model.layers.0.mlp", E, F, H)
        w.add("talker.model.layers.0.mlp.shared_expert.gate_proj.weight", F, H)
        w.add("talker.codec_head.weight", 16, H)
        w.add("code2wav.decoder.0.conv.weight", 2, 2, 3, dtype=torch.float32)
    _write(path, w.tensors)
    return w.tensors


def glm45v(path: Path) -> dict:
    E, F, H, layers, dense = 4, 3, 8, 3, 1  # noqa: N806
    transformers.Glm4vMoeConfig(
        text_config={
            "num_hidden_layers": layers,
            "n_routed_experts": E,
            "first_k_dense_replace": dense,
            "hidden_size": H,
            "moe_intermediate_size": F,
            "intermediate_size": 12,
            "vocab_size": 16,
        },
        architectures=["Glm4vMoeForConditionalGeneration"],
    ).save_pretrained(path)
    w = _Weights(2)
    w.add("model.language_model.embed_tokens.weight", 16, H)
    for n in range(layers + 1):  # layer `layers` is an MTP layer past num_hidden_layers: left alone
        p = f"model.language_model.layers.{n}"
        w.add(f"{p}.input_layernorm.weight", H)
        if n < dense:
            for name, shape in (("gate_proj", (12, H)), ("up_proj", (12, H)), ("down_proj", (H, 12))):
                w.add(f"{p}.mlp.{name}.weight", *shape)
            continue
        w.add(f"{p}.mlp.gate.weight", E, H)
        w.add(f"{p}.mlp.gate.e_score_correction_bias", E, dtype=torch.float32)
        w.add(f"{p}.mlp.shared_experts.gate_proj.weight", F, H)
        w.experts(f"{p}.mlp", E, F, H)
    w.add("model.language_model.norm.weight", H)
    w.add("model.visual.blocks.0.attn.qkv.weight", 6, 2)
    w.add("lm_head.weight", 16, H)
    _write(path, w.tensors)
    return w.tensors


def internvl35(path: Path) -> dict:
    E, F, H, layers = 4, 4, 6, 2  # noqa: N806
    llm = transformers.Qwen3MoeConfig(
        num_hidden_layers=layers,
        num_experts=E,
        hidden_size=H,
        moe_intermediate_size=F,
        vocab_size=16,
        architectures=["Qwen3MoeForCausalLM"],
    ).to_dict()
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "llm_config": llm,
        "template": "internvl2_5",
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 4},
    }
    w = _Weights(3)
    w.add("language_model.model.embed_tokens.weight", 16, H, dtype=torch.float32)
    for n in range(layers):
        p = f"language_model.model.layers.{n}"
        w.add(f"{p}.post_attention_layernorm.weight", H, dtype=torch.float32)
        w.add(f"{p}.mlp.gate.weight", E, H, dtype=torch.float32)
        w.experts(f"{p}.mlp", E, F, H, dtype=torch.float32)
    w.add("language_model.lm_head.weight", 16, H, dtype=torch.float32)
    w.add("vision_model.embeddings.patch_embedding.weight", 4, 3, 2, 2, dtype=torch.float32)
    w.add("mlp1.1.weight", H, 4, dtype=torch.float32)
    _write(path, w.tensors, config)
    (path / "configuration_internvl_chat.py").write_text(INTERNVL_CONFIG_PY)
    return w.tensors


MODELS = {"qwen3_omni": qwen3_omni, "glm45v": glm45v, "internvl35": internvl35}


def _read(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in path.glob("*.safetensors"):
        state.update(load_file(str(file)))
    return state


def assert_bit_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        a, b = got[k], want[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (k, a.dtype, list(a.shape), b.dtype, list(b.shape))
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)), k


def assert_side_files_copied(src: Path, dst: Path):
    """Every file MindSpeed-MM copies, but the source index (the output has its own) and hidden
    names (.gitattributes, and .git/.cache folders, which can hold whole LFS weight copies)."""
    want = {n for n in mindspeed.copied_files(src) if n != "model.safetensors.index.json" and not n.startswith(".")}
    got = mindspeed.copied_files(dst) - {"model.safetensors.index.json"}
    assert got == want and "assets/speakers.txt" in got
    assert all((dst / n).read_bytes() == (src / n).read_bytes() for n in want)


def _cli(*argv):
    assert cli(["experts", *argv, "--quiet"]) == 0


@pytest.mark.parametrize("model", sorted(MODELS))
def test_merge_and_split_equal_mindspeed_mm(tmp_path, model):
    source = MODELS[model](tmp_path / "hf")
    _cli("merge", str(tmp_path / "hf"), str(tmp_path / "merged"))
    merged = _read(tmp_path / "merged")
    assert_bit_equal(merged, mindspeed.merge(tmp_path / "hf"))
    assert_side_files_copied(tmp_path / "hf", tmp_path / "merged")

    _cli("split", str(tmp_path / "merged"), str(tmp_path / "split"))
    assert_bit_equal(_read(tmp_path / "split"), source)
    assert_side_files_copied(tmp_path / "merged", tmp_path / "split")
    reference = mindspeed.split(tmp_path / "merged")
    if model == "qwen3_omni":
        # MindSpeed-MM's split puts "thinker." before every key, the talker's too ("thinker.talker.*"),
        # which no model loads; ours puts it back where merge took it off.
        assert any(k.startswith("thinker.talker.") for k in reference)
        reference = {
            k.removeprefix("thinker.") if k.startswith(("thinker.talker.", "thinker.code2wav.")) else k: v
            for k, v in reference.items()
        }
    assert_bit_equal(_read(tmp_path / "split"), reference)


def test_qwen3_omni_thinker_only_split_equals_mindspeed_mm(tmp_path):
    """A thinker-only checkpoint (what MindSpeed-MM trains): its split is MindSpeed-MM's exactly."""
    source = qwen3_omni(tmp_path / "hf", talker=False)
    _cli("merge", str(tmp_path / "hf"), str(tmp_path / "hf" / "merged"))  # inside SRC: not copied into itself
    assert not (tmp_path / "hf" / "merged" / "merged").exists()
    (tmp_path / "hf" / "merged").rename(tmp_path / "merged")
    merged = _read(tmp_path / "merged")
    assert merged["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 8, 8)
    assert not any(k.startswith("thinker.") for k in merged)
    _cli("split", str(tmp_path / "merged"), str(tmp_path / "split"))
    assert_bit_equal(_read(tmp_path / "split"), mindspeed.split(tmp_path / "merged"))
    assert_bit_equal(_read(tmp_path / "split"), source)


def test_qwen3_omni_to_dcp_as_mindspeed_mm_and_back(tmp_path):
    """``convert --to dcp --prefix model.=`` saves what MindSpeed-MM's DCP converter saves;
    ``convert --to hf`` gives the per-expert checkpoint back."""
    source = qwen3_omni(tmp_path / "hf")
    assert (
        cli(["convert", "--to", "dcp", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--prefix", "model.=", "--quiet"])
        == 0
    )
    reader = dcp.FileSystemReader(str(tmp_path / "dcp"))
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in reader.read_metadata().state_dict_metadata.items()
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    assert_bit_equal(state, mindspeed.merge_to_dcp(tmp_path / "hf"))
    assert (
        cli(
            [
                "convert",
                "--to",
                "hf",
                str(tmp_path / "dcp"),
                str(tmp_path / "back"),
                "--prefix",
                "model.=",
                "--config-from",
                str(tmp_path / "hf"),
                "--quiet",
            ]
        )
        == 0
    )
    assert_bit_equal(_read(tmp_path / "back"), source)


@pytest.mark.slow
def test_merge_and_split_under_torchrun_two_ranks(tmp_path):
    runs = []
    for model, make in MODELS.items():
        make(tmp_path / model)
        runs += [
            ["experts", "merge", str(tmp_path / model), str(tmp_path / f"{model}-merged"), "--quiet"],
            ["experts", "split", str(tmp_path / f"{model}-merged"), str(tmp_path / f"{model}-split"), "--quiet"],
        ]
    # Refused on every rank with the same message, nothing written: GLM-4.5V's merged output
    # holds no per-expert tensors to merge.
    runs.append(["experts", "merge", str(tmp_path / "glm45v-merged"), str(tmp_path / "refused"), "--quiet"])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(REPO / "tests" / "cli_driver.py"),
            json.dumps(runs),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("experts merge: done") == 3  # once per command: rank 0 reports
    missing = "'model.language_model.layers.1.mlp.experts.0.gate_proj.weight' is missing"
    for rank in (0, 1):
        assert f"rank {rank}: exit 1" in done.stdout, done.stdout[-2000:]
    assert done.stderr.count(f"dcp-hf experts merge: expert tensor {missing}") == 1, done.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    for model in MODELS:
        assert_bit_equal(_read(tmp_path / f"{model}-merged"), mindspeed.merge(tmp_path / model))
        assert_bit_equal(_read(tmp_path / f"{model}-split"), _read(tmp_path / model))
        assert_side_files_copied(tmp_path / model, tmp_path / f"{model}-merged")


def _refused(tmp_path, *argv, match):
    """The command fails with one message matching ``match`` (exit 1) and writes nothing."""
    dst = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(["experts", *argv[:2], str(dst), *argv[2:], "--quiet"])
    assert code == 1 and re.search(match, err.getvalue()), err.getvalue()
    assert not dst.exists() or not any(dst.iterdir()), "nothing may be written"


def test_what_the_forms_cannot_hold_is_refused_before_writing(tmp_path):
    hf = tmp_path / "hf"
    tensors = glm45v(hf)
    config = json.loads((hf / "config.json").read_text())

    # A model type with no known merged form, under --layout auto.
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "glm4v", "text_config": {}}))
    _refused(tmp_path, "merge", str(hf), match="model type 'glm4v': no known merged-experts form")
    # A MindSpeed-MM model whose config lacks what places its experts.
    del config["text_config"]["first_k_dense_replace"]
    (hf / "config.json").write_text(json.dumps(config))
    _refused(tmp_path, "merge", str(hf), match=r"text_config\.first_k_dense_replace \(one integer >= 0\)")
    config["text_config"]["first_k_dense_replace"] = 1
    (hf / "config.json").write_text(json.dumps(config))

    # An MoE layer of the range without its experts (MindSpeed-MM: KeyError).
    save_file(
        {k: v for k, v in tensors.items() if ".layers.2.mlp.experts." not in k},
        str(hf / "model-00001-of-00002.safetensors"),
    )
    (hf / "model-00002-of-00002.safetensors").unlink()
    (hf / "model.safetensors.index.json").unlink()
    _refused(
        tmp_path, "merge", str(hf), match=r"'model.language_model.layers.2.mlp.experts.0.gate_proj.weight' is missing"
    )
    # Fewer experts than the config says.
    save_file(
        {k: v for k, v in tensors.items() if ".experts.3." not in k}, str(hf / "model-00001-of-00002.safetensors")
    )
    _refused(tmp_path, "merge", str(hf), match="3 experts in the checkpoint, the layout expects 4")


def test_qwen3_omni_names_and_forms_that_do_not_round_trip_are_refused(tmp_path):
    hf = tmp_path / "hf"
    tensors = qwen3_omni(hf)
    # A key outside thinker./talker./code2wav.: split could not tell whether it had "thinker.".
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(hf / "model-00001-of-00002.safetensors"))
    (hf / "model-00002-of-00002.safetensors").unlink()
    (hf / "model.safetensors.index.json").unlink()
    _refused(tmp_path, "merge", str(hf), match=r"no name for \['extra.weight'\]")
    # "thinker.talker.x" would become "talker.x", the name of another tensor.
    save_file(
        {**tensors, "thinker.talker.codec_head.weight": torch.zeros(2)}, str(hf / "model-00001-of-00002.safetensors")
    )
    _refused(tmp_path, "merge", str(hf), match="'thinker.talker.codec_head.weight'")

    # A merged checkpoint in the flat form (as dcp-hf wrote Qwen3-Omni before): not MindSpeed-MM's.
    save_file(tensors, str(hf / "model-00001-of-00002.safetensors"))
    _cli("merge", str(hf), str(tmp_path / "flat"), "--layout", "flat")
    assert _read(tmp_path / "flat")["model.layers.0.mlp.experts.gate_up_proj"].shape == (32, 8)
    _refused(tmp_path, "split", str(tmp_path / "flat"), match="in the 'flat' form, not MindSpeed-MM's 'mindspeed'")
    # A merged layer missing.
    merged = _read(tmp_path / "flat")
    del merged["model.layers.1.mlp.experts.down_proj"]
    save_file(merged, str(tmp_path / "flat" / "model.safetensors"))
    _refused(
        tmp_path,
        "split",
        str(tmp_path / "flat"),
        "--layout",
        "flat",
        match="'thinker.model.layers.1.mlp.experts.down_proj' is missing",
    )


@pytest.mark.slow
def test_merge_to_s3_and_split_back(tmp_path, s3, monkeypatch):
    """An S3 DST and an S3 SRC: the config is read through the store, and the top-level side
    files travel with the writer (subfolders are copied only between local folders)."""
    for k, v in s3.env.items():  # the standard AWS chain, as a user of the command line has it
        monkeypatch.setenv(k, v)
    source = glm45v(tmp_path / "hf")
    url = f"s3://{s3.bucket('dcp-hf-mindspeed')}/merged"
    _cli("merge", str(tmp_path / "hf"), url)
    _cli("split", url, str(tmp_path / "split"))
    assert_bit_equal(_read(tmp_path / "split"), source)
    top = {n for n in mindspeed.copied_files(tmp_path / "hf") if "/" not in n and not n.startswith(".")}
    assert mindspeed.copied_files(tmp_path / "split") == top - {"model.safetensors.index.json"}
