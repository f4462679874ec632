"""``import_hf`` / ``dcp-hf import --to megatron``: an HF checkpoint -> Megatron ``torch_dist``,
checked with megatron-core's own loader as the oracle: the import loaded by
``dist_checkpointing.load`` into GPTModels at 1 process and at TP/PP/VPP/EP/ETP layouts equals,
bit for bit, what ``load_hf`` puts into the same models; the loaded parameters, gathered and
converted the textbook way (testkit/megatron_oracle.py's oracle, which shares nothing with
dcp_hf's tables), are the HF tensors; ``export`` of the import gives them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from dcp_hf.local_ranks import run_ranks
from tests import import_workers as iw
from tests import megatron_workers as mw
from tests.cli_driver import run_cli
from tests.test_megatron import COMMON, assert_same, read_hf

pytestmark = pytest.mark.slow  # Megatron models, processes of their own
pytest.importorskip("megatron.core")
tf = pytest.importorskip("transformers")

from dcp_hf.megatron.build import Parallel  # noqa: E402
from tests import test_megatron_families as tmf  # noqa: E402

MOE = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
CONFIGS = {  # 4 layers where a layout splits them into PP2 x VPP2
    "llama": lambda: tf.LlamaConfig(num_hidden_layers=4, **COMMON),
    "qwen3": lambda: tf.Qwen3Config(num_hidden_layers=4, head_dim=8, **COMMON),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_hidden_layers=4, head_dim=8, norm_topk_prob=True, **MOE, **COMMON),
    "deepseek_v3": tmf.CONFIGS["deepseek_v3"],  # dense + MoE layers, MLA, MTP layer
    "qwen2": lambda: tf.Qwen2Config(num_hidden_layers=2, **COMMON),  # q/k/v biases
    **{f: tmf.CONFIGS[f] for f in ("mistral", "qwen2_moe", "mixtral", "glm4_moe", "deepseek_v2")},
}
ETP1, ETP2 = Parallel(tp=2, ep=2, etp=1), Parallel(tp=2, ep=2)
LAYOUTS = {  # on 4 processes
    "llama": [Parallel(tp=2, pp=2), Parallel(pp=2, vpp=2)],
    "qwen3": [Parallel(tp=2, pp=2), Parallel(pp=2, vpp=2)],
    "qwen3_moe": [ETP1, ETP2, Parallel(pp=2, vpp=2)],
    "deepseek_v3": [Parallel(tp=2, pp=2, first=1, last=2), ETP1, ETP2],
    "qwen2": [Parallel(tp=2, pp=2)],
    **{f: tmf.parallel_layouts(f) for f in ("mistral", "qwen2_moe", "mixtral", "glm4_moe", "deepseek_v2")},
}


def test_families_and_layouts_against_megatron_loader(tmp_path):
    """Every family imported in 1 process and in 4, loaded by megatron-core at 1 process and at
    TP2/PP2, PP2/VPP2, TP2/EP2 with ETP1 and ETP2 (what applies to the family)."""
    from dcp_hf.megatron.export import export_torch_dist

    prepared = {f: tmf.prepare(tmp_path, f, CONFIGS[f]()) for f in CONFIGS}
    jobs = {
        world: [
            (str(src), str(tmp_path / f / f"ckpt{world}"), str(tmp_path / f / f"w{world}"), layouts)
            for f, (_, src, _) in prepared.items()
            for layouts in [[Parallel()] if world == 1 else LAYOUTS[f]]
        ]
        for world in (1, 4)
    }
    found = {}
    for world in (1, 4):
        for result in run_ranks(iw.import_and_check, world, jobs[world], timeout=1500):
            for ckpt, per_layout in result.items():
                found.setdefault(ckpt, []).append(per_layout)
    for f, (_, src, hf) in prepared.items():
        source = read_hf(src)
        oracle = mw.Oracle.of(hf, mtp=1 if hf.get("num_nextn_predict_layers") else 0)
        for world in (1, 4):
            layouts = [Parallel()] if world == 1 else LAYOUTS[f]
            ckpt = tmp_path / f / f"ckpt{world}"
            for rank_result in found[str(ckpt)]:
                for p, bad in zip(layouts, rank_result):
                    assert not bad, f"{f}, imported on {world}, loaded at {p}: differs from load_hf: {bad[:8]}"
            for i, p in enumerate(layouts):  # the loaded parameters are the HF tensors (independent oracle)
                want = mw.oracle_hf(tmp_path / f / f"w{world}" / f"dump{i}", oracle)
                assert_same(want, source, f"{f}, imported on {world}, loaded at {p}, vs the oracle")
            exported = tmp_path / f / f"hf{world}"
            export_torch_dist(str(ckpt / "iter_0000001"), str(exported), str(src))
            assert_same(read_hf(exported), source, f"{f}: export of the import on {world}")
            assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1\n"
            assert json.loads((ckpt / "iter_0000001" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
            common = torch.load(ckpt / "iter_0000001" / "common.pt", weights_only=False)
            assert common["iteration"] == 1 and common["checkpoint_version"] == 3.0
    # megatron-core's default form: layers stacked where all are alike, experts stacked
    stored = FileSystemReader(str(tmp_path / "mixtral" / "ckpt1" / "iter_0000001")).read_metadata()
    assert list(stored.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == [
        2,
        4,
        32,
        32,
    ]
    stored = FileSystemReader(str(tmp_path / "deepseek_v3" / "ckpt1" / "iter_0000001")).read_metadata()
    assert "decoder.layers.1.mlp.experts.experts.linear_fc2.weight" in stored.state_dict_metadata


def test_same_files_as_megatron_save(tmp_path):
    """The import's tensors (keys, shapes, dtypes, chunks) and objects are those
    ``dist_checkpointing.save`` writes for the model at one process."""
    _, src, _ = tmf.prepare(tmp_path, "qwen3_moe", CONFIGS["qwen3_moe"]())
    ckpt, saved = tmp_path / "ckpt", tmp_path / "saved"
    run_ranks(iw.import_and_save, 1, str(src), str(ckpt), str(saved), timeout=600, daemon=False)
    ours = FileSystemReader(str(ckpt / "iter_0000001")).read_metadata().state_dict_metadata
    theirs = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert sorted(ours) == sorted(theirs)
    for key, entry in theirs.items():
        if hasattr(entry, "size"):
            mine = ours[key]
            assert (mine.size, mine.properties.dtype) == (entry.size, entry.properties.dtype), key
            assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in mine.chunks) == sorted(
                (tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks
            ), key
    assert (ckpt / "iter_0000001" / "metadata.json").read_text() == (saved / "metadata.json").read_text()


def _torchrun(*args, nproc=2):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "dcp_hf",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_one_process_and_torchrun(tmp_path):
    """``dcp-hf import --to megatron`` plainly and under torchrun (2 processes): the export of the
    import is the HF checkpoint; a DST that exists, and a config no family expresses, are
    refused with nothing written."""
    from dcp_hf.megatron.export import export_torch_dist

    for family, launch in (("qwen3", run_cli), ("qwen3_moe", _torchrun)):
        _, src, _ = tmf.prepare(tmp_path, family, CONFIGS[family]())
        dst = tmp_path / family / "mcore"
        done = launch("import", "--to", "megatron", "--quiet", src, dst)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "dcp-hf import --to megatron: done" in done.stdout, done.stdout
        export_torch_dist(str(dst / "iter_0000001"), str(tmp_path / family / "hf"), str(src))
        assert_same(read_hf(tmp_path / family / "hf"), read_hf(src), f"{family} via the CLI")
        again = run_cli("import", "--to", "megatron", src, dst)
        assert again.returncode == 1 and "exists" in again.stderr, again.stderr
    src = tmp_path / "qwen3" / "src"
    config = json.loads((src / "config.json").read_text())
    for name, change in (("gelu", {"hidden_act": "gelu"}), ("gemma", {"model_type": "gemma2"})):
        bad = tmp_path / name
        bad.mkdir()
        for file in src.iterdir():
            (bad / file.name).symlink_to(file)
        (bad / "config.json").unlink()
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        done = run_cli("import", "--to", "megatron", bad, tmp_path / f"{name}-out")
        assert done.returncode == 1, (name, done.stderr)
        assert not (tmp_path / f"{name}-out").exists(), name
