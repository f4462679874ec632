"""The command line as a user meets it: each mistake is a short message naming the flag to use,
exit code 1 (2 for a wrong command line), and no traceback unless --debug. Most cases call
``main`` in this process (fast); those about what a user's terminal shows (warnings, tracebacks,
progress bars) run ``python -m dcp_hf`` as a process."""

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from tests.cli_driver import run_cli


def cli_process(*args):
    """``dcp-hf ARGS`` as a process: exit code, stdout, stderr."""
    proc = run_cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


def cli(*args):
    """``dcp-hf ARGS`` in this process: exit code, stdout, stderr."""
    from dcp_hf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def short_error(stderr: str, command: str) -> str:
    """The one-line message of a failed command, checked to be nothing more."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) <= 2, stderr
    assert lines[-1].startswith(f"dcp-hf {command}: "), stderr
    return lines[-1]


DENSE = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A dense HF checkpoint (with a llama config.json) and the same tensors as native DCP."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    state = {k: torch.randn(s) for k, s in DENSE.items()}
    (root / "hf").mkdir()
    save_file(state, root / "hf" / "model.safetensors")
    (root / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(root / "dcp"), no_dist=True)
    return root


def test_inspect_missing_folder(tmp_path):
    rc, _, err = cli("inspect", tmp_path / "nope")
    assert rc == 1
    assert "does not exist" in short_error(err, "inspect")


def test_inspect_single_safetensors_file(ckpts):
    rc, out, err = cli("inspect", "-v", ckpts / "hf" / "model.safetensors")
    assert rc == 0, err
    assert "model.norm.weight  F32  [8]" in out and "total: 4 tensors in 1 files" in out


def test_inspect_names_a_dcp_folder(ckpts):
    rc, _, err = cli("inspect", ckpts / "dcp")
    assert rc == 1
    assert "native DCP checkpoint" in short_error(err, "inspect")


def test_convert_to_hf_of_an_hf_folder_says_to_use_to_dcp(ckpts, tmp_path):
    rc, _, err = cli("convert", "--to", "hf", ckpts / "hf", tmp_path / "out")
    assert rc == 1
    message = short_error(err, "convert")
    assert "is an HF checkpoint" in message and "--to dcp" in message
    assert not (tmp_path / "out").exists()


def test_convert_into_an_existing_checkpoint_names_overwrite_flag(ckpts):
    rc, _, err = cli("convert", "--to", "hf", ckpts / "dcp", ckpts / "hf")
    assert rc == 1
    message = short_error(err, "convert")
    assert "--overwrite" in message and "overwrite=True" not in message


def test_library_error_inside_dcp_save_is_unwrapped_and_names_the_flag(ckpts, tmp_path):
    """A stale index alone is not recognised up front; the writer's refusal comes back from
    inside dcp.save (a CheckpointException on every rank) as one line naming --overwrite."""
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    rc, _, err = cli_process("convert", "--to", "hf", ckpts / "dcp", tmp_path, "--quiet")
    assert rc == 1
    message = short_error(err, "convert")
    assert "already holds a checkpoint" in message and "pass --overwrite" in message
    assert "HFStorageWriter" not in message
    rc, _, err = cli_process("convert", "--to", "hf", ckpts / "dcp", tmp_path, "--quiet", "--debug")
    assert rc == 1 and "Traceback" in err  # --debug keeps the whole story


def test_convert_warns_nothing_without_torchrun(ckpts, tmp_path):
    rc, out, err = cli_process("convert", "--to", "dcp", ckpts / "hf", tmp_path / "dcp", "--quiet")
    assert rc == 0, err
    assert "torch.distributed is disabled" not in err and "Warning" not in err, err
    assert "done (tensors: 4)" in out


def test_convert_shows_progress_unless_quiet(ckpts, tmp_path):
    nbytes = sum(torch.Size(shape).numel() * 4 for shape in DENSE.values())
    for to, src in (("dcp", ckpts / "hf"), ("hf", ckpts / "dcp")):
        rc, _, err = cli("convert", "--to", to, src, tmp_path / to)
        assert rc == 0, err
        assert f"| {nbytes / 1e3:.2f}k/{nbytes / 1e3:.2f}k [" in err.split("dcp-hf save: 100%")[-1], err
        rc, _, err = cli("convert", "--to", to, src, tmp_path / to, "--overwrite", "--quiet")
        assert rc == 0 and err == "", err


def test_demo_nproc_zero_is_a_usage_error():
    rc, _, err = cli("demo", "--nproc", "0")
    assert rc == 2 and "Traceback" not in err
    assert "--nproc: expected a whole number of at least 1" in err


def release_folder(path):
    """The HF folder a DCP checkpoint was trained from: config, tokenizer, and weights in
    another format (not to be copied)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "vocab_size": 16}))
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "pytorch_model.bin").write_bytes(b"another checkpoint's weights")
    return path


def test_convert_to_hf_commits_config_from_files_with_the_weights(ckpts, tmp_path, monkeypatch):
    """--config-from's config and tokenizer are in place when the writer's commit returns (not
    copied after it, where a crash would leave weights without a config); its other weights
    are not copied."""
    from dcp_hf.storage import HFStorageWriter

    release = release_folder(tmp_path / "release")
    at_commit = []
    finish = HFStorageWriter.finish

    def finish_then_look(self, *args, **kwargs):
        finish(self, *args, **kwargs)
        at_commit.append(sorted(os.listdir(self.path)))

    monkeypatch.setattr(HFStorageWriter, "finish", finish_then_look)
    out = tmp_path / "out"
    rc, _, err = cli("convert", "--to", "hf", ckpts / "dcp", out, "--config-from", release, "--quiet")
    assert rc == 0, err
    assert at_commit == [["config.json", "model.safetensors", "tokenizer.json"]]
    assert json.loads((out / "config.json").read_text()) == json.loads((release / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (release / "tokenizer.json").read_bytes()


def test_convert_to_hf_that_fails_before_its_commit_leaves_no_config(ckpts, tmp_path):
    """The DCP source's data file cut short: the conversion fails while writing the weights,
    and no config or tokenizer file is left in or beside the output folder."""
    import shutil

    src = tmp_path / "dcp"
    shutil.copytree(ckpts / "dcp", src)
    (data,) = src.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    release = release_folder(tmp_path / "release")
    (tmp_path / "out").mkdir()
    rc, _, err = cli("convert", "--to", "hf", src, tmp_path / "out" / "hf", "--config-from", release, "--quiet")
    assert rc == 1, err
    message = short_error(err, "convert")
    assert str(src) in message and "ends early or is corrupt" in message and "unexpected" not in message, message
    left = [p.name for p in (tmp_path / "out").rglob("*")]
    assert "config.json" not in left and "tokenizer.json" not in left, left


def test_export_with_an_incomplete_config_names_the_missing_key(ckpts, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    rc, _, err = cli(
        "export", "--from", "megatron", ckpts / "dcp", tmp_path / "out", "--config", tmp_path / "config.json"
    )
    assert rc == 1
    message = short_error(err, "export")
    assert "num_attention_heads" in message and "full HF config.json" in message


def test_experts_merge_of_a_dense_model_is_an_error(ckpts, tmp_path):
    rc, _, err = cli("experts", "merge", "--layout", "transformers", ckpts / "hf", tmp_path / "out")
    assert rc == 1
    assert "no per-expert tensors to merge" in short_error(err, "experts merge")
    assert not (tmp_path / "out").exists()


def test_experts_split_without_a_layout_names_the_flag(ckpts, tmp_path):
    rc, _, err = cli("experts", "split", ckpts / "hf", tmp_path / "out")
    assert rc == 1
    assert "--layout transformers|mindspeed|flat" in short_error(err, "experts split")


def test_help_is_plain_and_per_subcommand():
    rc, out, _ = cli_process("--help")
    assert rc == 0 and "``" not in out and "torchrun --nproc-per-node" in out
    rc, out, _ = cli("experts", "merge", "--help")
    assert rc == 0 and out.startswith("usage: dcp-hf experts merge")
    rc, out, _ = cli("convert", "--help")
    assert "(default: 5GB)" in out
    # every argument of every command has a help text
    from dcp_hf.cli import build_parser

    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                assert action.help, f"{p.prog}: {action.dest} has no help"


def test_demo_help_states_the_size_it_writes():
    from dcp_hf.models import LlamaShape

    nbytes = sum(torch.Size(s).numel() for s in LlamaShape().tensors().values()) * 2
    rc, out, _ = cli("demo", "--help")
    assert f"small: {nbytes / 1e6:.1f} MB" in " ".join(out.split())


def test_unexpected_error_is_one_line_that_asks_for_debug(monkeypatch):
    """A bug (not a user mistake) is one line too, pointing at --debug."""
    import dcp_hf.inspect

    def broken(path, verbose=False):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(dcp_hf.inspect, "inspect_checkpoint", broken)
    rc, _, err = cli("inspect", os.__file__.replace("os.py", "nope.safetensors"))
    assert rc == 1 and "does not exist" in err  # checked before the command runs
    monkeypatch.setattr(sys.modules["dcp_hf.cli"], "require", lambda *a, **k: "hf")
    rc, _, err = cli("inspect", "x")
    assert rc == 1
    assert short_error(err, "inspect").startswith("dcp-hf inspect: unexpected ZeroDivisionError")
    assert "--debug" in err


@pytest.mark.slow
def test_demo_shows_every_ranks_bytes_and_its_output_loads_with_from_pretrained(tmp_path):
    """2 ranks share the demo's 38.5 MB: the coordinator's save and load bars end at the whole
    checkpoint's size (not its own half). The output loads in transformers as it is."""
    from dcp_hf.models import LlamaShape

    total = sum(torch.Size(s).numel() for s in LlamaShape().tensors().values()) * 2
    rc, out, err = cli_process("demo", "--output", tmp_path / "demo", "--nproc", "2")
    assert rc == 0, err
    shown = f"{total / 1e6:.1f}M/{total / 1e6:.1f}M"
    for phase in ("save", "load"):
        finals = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(f"dcp-hf {phase}: 100%")]
        assert finals and shown in finals[-1], err
    assert len(list((tmp_path / "demo").glob("model-*-of-*.safetensors"))) == 2  # 20MB shards
    # run again (the README's set-up command), into its own output: replaced, without --overwrite
    rc, out, err = cli_process("demo", "--output", tmp_path / "demo", "--nproc", "2", "--max-shard-size", "1GB")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "demo")) == ["config.json", "model.safetensors"]
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "demo", output_loading_info=True, local_files_only=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(8).view(1, 8)).logits.float()).all()


# -- the demo's --output, and where every command writes ---------------------------------------
def demo_like(path, config=None, names=("model.safetensors",)):
    """A folder laid out as a demo output: config.json (the small demo's unless given) and
    ``names`` (safetensors files hold one tensor)."""
    from dcp_hf.models import LlamaShape

    path.mkdir()
    (path / "config.json").write_text(json.dumps(config or LlamaShape().hf_config(torch.bfloat16)))
    for name in names:
        if name.endswith(".safetensors"):
            save_file({"x": torch.zeros(2)}, path / name)
        else:
            (path / name).write_text("{}")
    return path


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_demo_recognises_only_a_previous_demo_output(tmp_path):
    """The rule written in ``demo --help``: only the names a demo writes, and the config.json a
    demo of either size writes, byte for byte in meaning."""
    from dcp_hf.demo import is_demo_output
    from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape

    small = LlamaShape().hf_config(torch.bfloat16)
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json")
    assert is_demo_output(demo_like(tmp_path / "one"))
    assert is_demo_output(demo_like(tmp_path / "shards", names=shards))
    assert is_demo_output(demo_like(tmp_path / "1b", LLAMA_1B_LIKE.hf_config(torch.bfloat16)))
    assert not is_demo_output(demo_like(tmp_path / "other-model", {**small, "num_hidden_layers": 5}))
    assert not is_demo_output(demo_like(tmp_path / "fp32", LlamaShape().hf_config(torch.float32)))
    assert not is_demo_output(demo_like(tmp_path / "notes", names=("model.safetensors", "notes.txt")))
    assert not is_demo_output(demo_like(tmp_path / "hidden", names=("model.safetensors", ".cache")))
    assert not is_demo_output(demo_like(tmp_path / "dcp", names=("model.safetensors", ".metadata")))
    assert not is_demo_output(demo_like(tmp_path / "no-weights", names=()))
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "config.json").write_text("{")
    assert not is_demo_output(tmp_path / "bad-json")
    assert not is_demo_output(tmp_path / "missing")


def test_demo_refuses_an_output_that_is_not_a_previous_demo_output(ckpts, tmp_path):
    """Another checkpoint (HF or DCP, or any file) at --output is left as it is, and the one-line
    message names the flag, the path and --overwrite. All before any process starts."""
    import shutil

    from dcp_hf.models import LlamaShape

    shutil.copytree(ckpts / "hf", tmp_path / "hf")
    shutil.copytree(ckpts / "dcp", tmp_path / "dcp")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    demo_like(tmp_path / "demo-and-more", names=("model.safetensors", "tokenizer.json"))
    demo_like(tmp_path / "another-config", {**LlamaShape().hf_config(torch.bfloat16), "vocab_size": 7})
    for name, held in [
        ("hf", "an HF checkpoint"),
        ("dcp", "a native DCP checkpoint"),
        ("notes", "files"),
        ("demo-and-more", "an HF checkpoint"),
        ("another-config", "an HF checkpoint"),
    ]:
        before = snapshot(tmp_path / name)
        rc, _, err = cli("demo", "--output", tmp_path / name, "--quiet")
        assert rc == 1, err
        message = short_error(err, "demo")
        assert message == (
            f"dcp-hf demo: --output {tmp_path / name} holds {held} and is not a previous demo's output "
            "(see --help); pass --overwrite to replace it, or choose another folder"
        )
        assert snapshot(tmp_path / name) == before


def test_demo_names_an_output_it_cannot_write(tmp_path):
    """A file, a folder under a file, a place where no folder can be made (/proc), a URL: one
    line naming --output, as a user's terminal shows it (no traceback of the demo's ranks)."""
    (tmp_path / "afile.txt").write_text("mine")
    cases = [
        (
            tmp_path / "afile.txt",
            f"--output {tmp_path / 'afile.txt'} is a file, not a checkpoint folder; give a folder",
        ),
        (
            tmp_path / "afile.txt" / "sub",
            f"--output {tmp_path / 'afile.txt' / 'sub'}: {tmp_path / 'afile.txt'} is a file",
        ),
        ("s3://bucket/demo", "--output s3://bucket/demo: the demo writes a local folder"),
    ]
    if os.path.isdir("/proc/self"):
        cases.append(("/proc/demo-x", "--output /proc/demo-x: cannot create a folder in /proc ("))
    for i, (output, expected) in enumerate(cases):
        run = cli_process if i == 0 else cli  # as a terminal shows it, then in this process (fast)
        rc, out, err = run("demo", "--output", output, "--quiet")
        assert rc == 1, err
        assert short_error(err, "demo").startswith(f"dcp-hf demo: {expected}"), err
        assert out == ""  # refused before the demo starts
    assert (tmp_path / "afile.txt").read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no folder can be made")
def test_every_writing_command_names_a_destination_it_cannot_write(ckpts, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    for command, argv in [
        ("convert", ["convert", "--to", "hf", ckpts / "dcp"]),
        ("convert", ["convert", "--to", "dcp", ckpts / "hf"]),
        ("convert", ["convert", "--to", "dequantized", ckpts / "hf"]),
        ("experts merge", ["experts", "merge", "--layout", "transformers", ckpts / "hf"]),
        ("export", ["export", "--from", "megatron", "--config", tmp_path / "config.json", ckpts / "dcp"]),
    ]:
        rc, _, err = cli(*argv, "/proc/dcp-hf-x", "--quiet")
        assert rc == 1, err
        message = short_error(err, command)
        assert message.startswith(f"dcp-hf {command}: DST /proc/dcp-hf-x: cannot create a folder in /proc ("), message


def test_overwrite_does_not_mix_an_hf_and_a_dcp_checkpoint(ckpts, tmp_path):
    """A checkpoint of either kind in DST is refused without --overwrite and replaced whole with
    it: the folder then holds the new kind's files only (no folder that is both)."""
    import shutil

    from dcp_hf.cli import checkpoint_kind

    dcp_files = lambda names: {n for n in names if n == ".metadata" or n.endswith(".distcp")}  # noqa: E731
    hf_files = lambda names: {n for n in names if n.endswith((".safetensors", ".index.json"))}  # noqa: E731
    for to, src, dst in [("hf", "dcp", "hf"), ("dcp", "hf", "dcp")]:
        shutil.copytree(ckpts / src, tmp_path / src)  # the folder to write into holds a `src` checkpoint
        before = snapshot(tmp_path / src)
        rc, _, err = cli("convert", "--to", to, ckpts / src, tmp_path / src, "--quiet")
        assert rc == 1 and "--overwrite" in short_error(err, "convert"), err
        assert snapshot(tmp_path / src) == before
        rc, _, err = cli("convert", "--to", to, ckpts / src, tmp_path / src, "--overwrite", "--quiet")
        assert rc == 0, err
        names = os.listdir(tmp_path / src)
        assert checkpoint_kind(str(tmp_path / src)) == to
        assert not (dcp_files if to == "hf" else hf_files)(names), names
        shutil.copytree(ckpts / dst, tmp_path / f"same-{dst}")  # the same kind: replaced
        keep = ["--config-from", tmp_path / f"same-{dst}"] if to == "hf" else []  # its config.json, kept on purpose
        rc, _, err = cli("convert", "--to", to, ckpts / src, tmp_path / f"same-{dst}", "--overwrite", *keep, "--quiet")
        assert rc == 0, err


def test_unknown_flag_of_a_command_shows_that_commands_usage():
    for i, (argv, usage, bad) in enumerate(
        [
            (["convert", "--to", "hf", "a", "b", "--overwirte"], "usage: dcp-hf convert ", "--overwirte"),
            (["convert", "a", "b", "--overwirte"], "usage: dcp-hf convert ", "--overwirte"),  # and --to is missing
            (["experts", "merge", "a", "b", "--bogus=3"], "usage: dcp-hf experts merge ", "--bogus=3"),
            (["demo", "--ouptut", "x"], "usage: dcp-hf demo ", "--ouptut"),
            (["--bogus", "inspect", "x"], "usage: dcp-hf [-h]", "--bogus"),
        ]
    ):
        rc, _, err = (cli_process if i == 0 else cli)(*argv)  # as a terminal shows it, then in this process
        assert rc == 2, err
        assert err.startswith(usage), err
        assert f"error: unrecognized arguments: {bad}" in err, err
    rc, _, err = cli("convert", "a", "b", "--overwirte")
    assert rc == 2 and err.splitlines()[-1] == (
        "dcp-hf convert: error: unrecognized arguments: --overwirte; and the following arguments are required: --to"
    )
    rc, _, err = cli("convert", "--to", "hf", "a", "b", "--over")  # a prefix of --overwrite is that flag
    assert rc == 1 and "SRC a does not exist" in err


def test_inspect_says_what_it_reads_and_that_a_file_is_neither(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    rc, _, err = cli("inspect", tmp_path / "config.json")
    assert rc == 1
    assert short_error(err, "inspect") == (
        f"dcp-hf inspect: PATH {tmp_path / 'config.json'} is neither a checkpoint folder nor a .safetensors file; "
        "inspect reads an HF checkpoint folder (local or an s3:// URL) or one .safetensors file"
    )
    rc, out, _ = cli("inspect", "--help")
    assert rc == 0 and "s3:// URL" in " ".join(out.split())


def test_version_is_the_package_version_from_one_place():
    import dcp_hf

    rc, out, err = cli_process("--version")
    assert rc == 0 and out == f"dcp-hf {dcp_hf.__version__}\n", err
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(os.path.dirname(dcp_hf.__file__), os.pardir, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dcp_hf.__version__"}


@pytest.mark.slow
def test_run_demo_replaces_a_checkpoint_only_when_told(ckpts, tmp_path):
    """The command line's check is not the only guard: run_demo itself passes overwrite=False to
    the writer unless told, so another checkpoint stays as it is."""
    import shutil

    from dcp_hf.demo import run_demo
    from dcp_hf.local_ranks import RankFailure
    from dcp_hf.models import LlamaShape

    shutil.copytree(ckpts / "hf", tmp_path / "hf")
    before = snapshot(tmp_path / "hf")
    with pytest.raises(RankFailure, match="CheckpointExistsError"):
        run_demo(str(tmp_path / "hf"), 1, LlamaShape(), "1GB")
    assert snapshot(tmp_path / "hf") == before


def test_library_errors_name_their_fix_and_the_cli_says_it_as_its_flag(tmp_path):
    """The writer's refusal to replace a checkpoint carries its fix as an option name (kept
    when the error travels to other ranks); the command line says it as --overwrite."""
    import pickle

    from dcp_hf import HFSavePlanner, HFStorageWriter
    from dcp_hf.cli import _as_cli_message
    from dcp_hf.errors import CheckpointExistsError, root_cause

    path = str(tmp_path / "ckpt")
    save = lambda: dcp.save(  # noqa: E731
        {"w": torch.ones(2)}, storage_writer=HFStorageWriter(path), planner=HFSavePlanner(), no_dist=True
    )
    save()
    with pytest.raises(BaseException) as caught:
        save()
    error = pickle.loads(pickle.dumps(root_cause(caught.value)))
    assert isinstance(error, CheckpointExistsError) and error.fix.option == "overwrite"
    assert str(error).endswith("pass overwrite=True to HFStorageWriter to replace it")
    assert _as_cli_message(error) == f"{error.reason}; pass --overwrite to replace it"
