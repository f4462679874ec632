"""Conversions a user can trust: nothing dropped silently, nothing half-written, clear refusals.
Oracles: the safetensors files as transformers wrote them (read with safetensors), and DCP's
own ``dcp.load`` of what we wrote."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from tests.moe_models import tiny_moe
from tests.test_cli import cli, short_error


def _hf_tensors(folder) -> dict:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _dcp_tensors(folder) -> dict:
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny transformers checkpoints saved by save_pretrained: llama, tied llama, qwen3-moe."""
    import transformers as tf

    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    cfg.tie_word_embeddings = True
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "llama_tied")
    tiny_moe("qwen3_moe").save_pretrained(root / "moe")  # per expert on disk
    assert cli("experts", "merge", root / "moe", root / "moe_merged", "--quiet")[0] == 0
    return root


def test_prefix_keeps_unmatched_keys(models, tmp_path):
    rc, out, err = cli("convert", "--to", "dcp", models / "llama", tmp_path / "d", "--prefix", "x.=model.", "--quiet")
    assert rc == 0, err
    hf = _hf_tensors(models / "llama")
    assert "lm_head.weight" in hf
    want = {("x." + k[len("model.") :] if k.startswith("model.") else k): v for k, v in hf.items()}
    got = _dcp_tensors(tmp_path / "d")
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_prefix_matching_nothing_is_refused(models, tmp_path):
    rc, _, err = cli("convert", "--to", "dcp", models / "llama", tmp_path / "d", "--prefix", "foo.=bar.", "--quiet")
    assert rc == 1
    line = short_error(err, "convert")
    assert str(models / "llama") in line and "'bar.'" in line
    assert not os.path.exists(tmp_path / "d")


def test_dcp_to_hf_prefix_matching_nothing_is_refused(models, tmp_path):
    assert cli("convert", "--to", "dcp", models / "llama", tmp_path / "d", "--quiet")[0] == 0
    rc, _, err = cli("convert", "--to", "hf", tmp_path / "d", tmp_path / "h", "--prefix", "foo.=bar.", "--quiet")
    assert rc == 1
    assert "'foo.'" in short_error(err, "convert")
    assert not os.path.exists(tmp_path / "h")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(*args, nproc: int = 2):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        + [os.path.join(REPO, "tests", "convert_workers.py"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _siblings(folder) -> list[str]:
    return sorted(n for n in os.listdir(os.path.dirname(folder)) if n.startswith("." + os.path.basename(folder)))


@pytest.mark.slow  # torchrun, 2 ranks
def test_failed_convert_to_dcp_is_whole_or_absent_on_every_rank(models, tmp_path):
    dst = str(tmp_path / "out")
    out = _torchrun(models / "llama", dst, 1)
    assert "rank 1: StorageError" in out or "rank 1: OSError" in out, out
    assert "injected read error" in out.split("rank 1:")[1].splitlines()[0], out
    assert "rank 0: " in out and "injected read error" in out.split("rank 0:")[1].splitlines()[0], out
    assert not os.path.exists(dst) and _siblings(dst) == []
    # With an old DST (replaced with --overwrite): a failure leaves it as it was.
    assert cli("convert", "--to", "dcp", models / "llama", dst, "--quiet")[0] == 0
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = {n: open(os.path.join(dst, n), "rb").read() for n in os.listdir(dst)}
    out = _torchrun(models / "llama_tied", dst, 0)
    assert out.count("injected read error") == 2, out
    assert {n: open(os.path.join(dst, n), "rb").read() for n in os.listdir(dst)} == before
    assert _siblings(dst) == []
    # and a success replaces it whole, the user's other files carried over
    assert "rank 0: ok" in _torchrun(models / "llama_tied", dst)
    assert sorted(os.listdir(dst)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "notes.txt"]
    got, want = _dcp_tensors(dst), _hf_tensors(models / "llama_tied")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # over an HF checkpoint (--overwrite): its weights go, its other files stay
    shutil.copytree(models / "llama", tmp_path / "hf")
    assert cli("convert", "--to", "dcp", models / "llama", tmp_path / "hf", "--overwrite", "--quiet")[0] == 0
    assert sorted(os.listdir(tmp_path / "hf")) == [".metadata", "__0_0.distcp", "config.json", "generation_config.json"]


def test_convert_to_dcp_of_merged_experts(models, tmp_path):
    """The merged HF checkpoint converts to the DCP that transformers' in-memory model holds."""
    import transformers as tf

    rc, _, err = cli("convert", "--to", "dcp", models / "moe_merged", tmp_path / "d", "--quiet")
    assert rc == 0, err
    want = tf.Qwen3MoeForCausalLM.from_pretrained(models / "moe").state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in want
    got = _dcp_tensors(tmp_path / "d")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in got)
    rc, _, err = cli("convert", "--to", "dcp", models / "moe_merged", tmp_path / "m", "--layout", "mindspeed")
    assert rc == 1
    line = short_error(err, "convert")
    assert "stored merged in the 'transformers' form" in line and "dcp-hf experts split" in line
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.slow  # torchrun, 2 ranks
def test_writer_refuses_a_file_or_an_unmakeable_folder_before_writing(tmp_path):
    (tmp_path / "afile.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    for dst, reason in [
        (tmp_path / "afile.txt", "afile.txt: exists and is not a folder"),
        (tmp_path / "afile.txt" / "x", f"afile.txt/x: cannot create it: {tmp_path / 'afile.txt'} is not a folder"),
    ]:
        out = _torchrun("save", dst)
        for rank in (0, 1):
            line = out.split(f"rank {rank}:")[1].splitlines()[0]
            assert line.startswith(" StorageError") and reason in line, out
    assert sorted(os.listdir(tmp_path)) == before  # no lock, no staging folder, no file
    assert (tmp_path / "afile.txt").read_text() == "mine"


def _load(sd, path):
    from dcp_hf import HFLoadPlanner, HFStorageReader

    dcp.load(sd, storage_reader=HFStorageReader(str(path)), planner=HFLoadPlanner(), no_dist=True)


def test_load_tied_embeddings_checkpoint_into_a_model(models):
    """save_pretrained writes a tied model without lm_head.weight; our load fills it through the
    embedding it is tied to: the logits equal those of transformers' own load."""
    import transformers as tf

    from tests.moe_models import logits

    path = models / "llama_tied"
    assert "lm_head.weight" not in _hf_tensors(path)
    want = tf.LlamaForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(1)
    model = tf.LlamaForCausalLM(want.config).eval()
    assert not torch.equal(logits(model), logits(want))
    _load(model.state_dict(), path)
    assert torch.equal(logits(model), logits(want))


def test_load_missing_key_not_tied_is_an_error(tmp_path):
    """Only the very same memory (storage, offset, shape, strides) counts as tied."""
    from safetensors.torch import save_file

    from dcp_hf.errors import StateDictMismatchError, root_cause

    embed = torch.randn(16, 8)
    save_file({"model.embed_tokens.weight": embed}, tmp_path / "model.safetensors")
    (v, h), n = embed.shape, embed.numel()
    buf = torch.zeros(2 * n)
    heads = [
        torch.zeros(v, h),  # a tensor of its own
        buf[n:].view(v, h),  # the same storage, another offset
        buf[:n].view(h, v).T,  # the same storage and offset, other strides
    ]
    for head in heads:
        with pytest.raises(BaseException) as caught:
            _load({"model.embed_tokens.weight": buf[:n].view(v, h), "lm_head.weight": head}, tmp_path)
        error = root_cause(caught.value)
        assert isinstance(error, StateDictMismatchError) and "allow_missing=['lm_head.weight']" in str(error)
    # the same storage and view: accepted, and filled
    base = buf[:n].view(v, h)
    _load({"model.embed_tokens.weight": base, "lm_head.weight": buf[:n].view(v, h)}, tmp_path)
    assert torch.equal(base, embed)


@pytest.mark.slow  # torchrun, 2 ranks
def test_load_tied_dtensors_two_ranks(tmp_path):
    from safetensors.torch import save_file

    save_file({"embed": torch.arange(32.0).view(8, 4)}, tmp_path / "model.safetensors")
    out = _torchrun("tied", tmp_path)
    for rank in (0, 1):
        assert f"rank {rank}: same ok True" in out, out
        assert f"rank {rank}: own StateDictMismatchError" in out and "allow_missing=['head']" in out, out


def test_malformed_or_absent_config_is_named(models, tmp_path):
    assert cli("convert", "--to", "dcp", models / "llama", tmp_path / "d", "--quiet")[0] == 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("not json")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "tokenizer.json").write_text("{}")
    (tmp_path / "list.txt").write_text("[1]")
    cases = [
        (
            ("convert", "--to", "hf", tmp_path / "d", tmp_path / "h", "--config-from", tmp_path / "bad"),
            f"{tmp_path / 'bad' / 'config.json'}: not a valid config.json: not JSON",
        ),
        (
            ("convert", "--to", "hf", tmp_path / "d", tmp_path / "h", "--config-from", tmp_path / "none"),
            f"{tmp_path / 'none'}: no config.json",
        ),
        (
            ("export", "--from", "megatron", tmp_path / "d", tmp_path / "h", "--config", tmp_path / "list.txt"),
            f"{tmp_path / 'list.txt'}: not a valid config.json: not a JSON object",
        ),
    ]
    for args, reason in cases:
        rc, _, err = cli(*args, "--quiet")
        assert rc == 1 and reason in short_error(err, args[0]), err
        assert not os.path.exists(tmp_path / "h")


def test_overwrite_keeps_no_stale_config(models, tmp_path):
    """convert --to hf over an HF folder refuses to keep its config.json beside weights it does
    not describe; --config-from DST keeps it on purpose (and the result loads in transformers)."""
    import transformers as tf

    from tests.moe_models import logits

    assert cli("convert", "--to", "dcp", models / "llama", tmp_path / "d", "--quiet")[0] == 0
    dst = tmp_path / "hf"
    shutil.copytree(models / "llama_tied", dst)
    before = {n: (dst / n).read_bytes() for n in os.listdir(dst)}
    rc, _, err = cli("convert", "--to", "hf", tmp_path / "d", dst, "--overwrite", "--quiet")
    assert rc == 1 and f"{dst}: holds a config.json" in short_error(err, "convert")
    assert {n: (dst / n).read_bytes() for n in os.listdir(dst)} == before
    shutil.rmtree(dst)
    shutil.copytree(models / "llama", dst)
    (dst / "model.safetensors").write_bytes(b"")  # an old checkpoint to replace
    rc, _, err = cli("convert", "--to", "hf", tmp_path / "d", dst, "--overwrite", "--config-from", dst, "--quiet")
    assert rc == 0, err
    want = tf.LlamaForCausalLM.from_pretrained(models / "llama").eval()
    assert torch.equal(logits(tf.LlamaForCausalLM.from_pretrained(dst).eval()), logits(want))


def test_converting_no_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    save_file({}, tmp_path / "hf" / "model.safetensors")
    dcp.save({"step": 3}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")), no_dist=True)
    for to, src in (("dcp", tmp_path / "hf"), ("hf", tmp_path / "dcp")):
        rc, _, err = cli("convert", "--to", to, src, tmp_path / "out", "--quiet")
        assert rc == 1 and f"{src}: no tensors to convert" in short_error(err, "convert")
        assert not os.path.exists(tmp_path / "out")


def test_an_hf_save_replaces_a_dcp_checkpoint_only_when_told(tmp_path):
    """torch's FileSystemWriter leaves a DCP checkpoint (the oracle of what its files are); an HF
    save into that folder is refused, and with overwrite replaces it whole: no .metadata or
    .distcp beside the new files, the user's other files kept."""
    from dcp_hf import HFSavePlanner, HFStorageWriter
    from dcp_hf.errors import CheckpointExistsError, root_cause

    folder = str(tmp_path / "ckpt")
    dcp.save({"old": torch.zeros(3)}, storage_writer=dcp.FileSystemWriter(folder))
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("mine")
    dcp_files = sorted(os.listdir(folder))
    assert ".metadata" in dcp_files and any(n.endswith(".distcp") for n in dcp_files)
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3)}
    with pytest.raises(BaseException) as refused:  # DCP wraps it, one process too
        dcp.save(state, storage_writer=HFStorageWriter(folder), planner=HFSavePlanner())
    assert isinstance(root_cause(refused.value), CheckpointExistsError)
    assert "already holds a checkpoint (.metadata" in str(root_cause(refused.value))
    assert sorted(os.listdir(folder)) == dcp_files
    dcp.save(state, storage_writer=HFStorageWriter(folder, overwrite=True), planner=HFSavePlanner())
    assert sorted(os.listdir(folder)) == ["model.safetensors", "notes.txt"]
    assert torch.equal(_hf_tensors(folder)["w"], state["w"])
