"""A checkpoint is whole or absent: a save killed at every mutating step of its commit leaves a
folder that loads as exactly the old or exactly the new checkpoint, with dcp-hf's reader and
with transformers' from_pretrained (which tries model.safetensors first, so switching between
one file and shards is covered). Each save runs in its own forked process with a timeout, and
kills itself at step N of the commit (``DCP_HF_KILL_AT``)."""

import json
import multiprocessing
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from transformers import LlamaConfig, LlamaForCausalLM

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import DcpHfError
from dcp_hf.format import INDEX_NAME
from dcp_hf.storage import commit

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
SINGLE, SHARDED = 10**9, 24_000  # max_shard_size: one file, or several


def weights(seed: int) -> dict[str, torch.Tensor]:
    """The oracle: independent random tensors of the model's shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in LlamaForCausalLM(CONFIG).state_dict().items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


A, B = weights(1), weights(2)


def save(path, state, max_shard_size, overwrite=True, planner=None):
    side = {"config.json": CONFIG.to_json_string().encode()}
    dcp.save(
        state,
        storage_writer=HFStorageWriter(path, max_shard_size=max_shard_size, overwrite=overwrite, side_files=side),
        planner=planner or HFSavePlanner(),
        no_dist=True,
    )


# The user's own files beside the weights: a save never moves, changes or removes them.
USER_FILES = {
    "notes.txt": "the user's own file",
    "tokenizer.json": '{"version": "1.0"}',
    "eval_results/x.json": '{"accuracy": 0.5}',
}
DURING = "trainer_state.json"  # written by the user at every step of the commit


def plant_user_files(path) -> int:
    """The user's files in the folder; the folder's inode."""
    for name, text in USER_FILES.items():
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text(text)
    return os.stat(path).st_ino


def check_user_files(path, inode, during=None) -> None:
    assert os.stat(path).st_ino == inode  # the folder itself is the same folder
    for name, text in USER_FILES.items():
        assert (path / name).read_text() == text, name
    if during is not None:
        assert (path / DURING).read_text() == during


def _child(path, max_shard_size, env):
    os.environ.update(env)
    commit.reset_steps()
    step = commit.step

    def user_writes_then_step(what):  # the user writes a file during each step of the commit
        with open(os.path.join(path, DURING), "w") as f:
            f.write(f"before step {commit._steps + 1}")
        step(what)

    commit.step = user_writes_then_step
    save(path, B, max_shard_size)
    os._exit(0)


def in_child(target, *args) -> int:
    """``target(*args)`` in a forked process (60 s at most); its exit code."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the child hung")
    return proc.exitcode


def save_b_in_child(path, max_shard_size, env) -> int:
    return in_child(_child, path, max_shard_size, env)


def which(state: dict[str, torch.Tensor]) -> str:
    for name, ref in (("A", A), ("B", B)):
        if state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref):
            return name
    return "mix"


def load_dcp_hf(path) -> str:
    state = {k: torch.zeros_like(v) for k, v in A.items()}
    dcp.load(state, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(), no_dist=True)
    return which(state)


def load_transformers(path) -> str:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return which(model.state_dict())


def count_steps(tmp_path, a_size, b_size, env=None) -> int:
    path, log = tmp_path / "count", tmp_path / "steps.log"
    save(path, A, a_size, overwrite=False)
    plant_user_files(path)
    assert save_b_in_child(str(path), b_size, {"DCP_HF_STEP_LOG": str(log), **(env or {})}) == 0
    steps = log.read_text().splitlines()
    assert any("remove" in s for s in steps) and any("rename" in s for s in steps), steps
    return len(steps)


@pytest.mark.parametrize(
    "a_size,b_size,env",
    [
        (SHARDED, SHARDED, {}),
        (SINGLE, SHARDED, {}),
        (SHARDED, SINGLE, {}),
        (SHARDED, SHARDED, {"DCP_HF_NO_EXCHANGE": "1"}),
    ],
    ids=["sharded-to-sharded", "single-to-sharded", "sharded-to-single", "sharded-without-renameat2"],
)
def test_killed_at_every_commit_step_the_folder_is_old_or_new(tmp_path, a_size, b_size, env):
    """Killed at any step, the folder loads as exactly A or B with both readers, and every
    file of the user's, one written during the commit included, is there and unchanged."""
    steps = count_steps(tmp_path, a_size, b_size, env)
    seen = []
    for k in range(1, steps + 2):  # k = steps + 1: never killed
        path = tmp_path / f"k{k}"
        save(path, A, a_size, overwrite=False)
        inode = plant_user_files(path)
        code = save_b_in_child(str(path), b_size, {"DCP_HF_KILL_AT": str(k), **env})
        assert code == (0 if k > steps else -9), (k, code)
        got = load_dcp_hf(path), load_transformers(path)
        assert got in (("A", "A"), ("B", "B")), (k, got)
        check_user_files(path, inode, f"before step {min(k, steps)}")
        seen.append(got[0])
        # The next save finishes what the killed one left, and commits.
        save(path, B, b_size)
        assert load_dcp_hf(path) == "B"
        check_user_files(path, inode, f"before step {min(k, steps)}")
        assert [e for e in os.listdir(tmp_path) if e.startswith(f".k{k}.")] == []
        assert not any(n.startswith(".") for n in os.listdir(path)), os.listdir(path)
        names = {n for n in os.listdir(path) if n.endswith(".safetensors")}  # B's files alone
        assert names == (
            {"model.safetensors"}
            if b_size == SINGLE
            else set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())
        )
    assert seen[0] == "A" and seen[-1] == "B"  # the kill points span the whole commit


def _hold_lock(path, ready):
    commit.acquire_lock(path, "0" * 12)
    ready.set()
    ready.wait()  # until killed
    os.kill(os.getpid(), 9)


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    path = tmp_path / "ckpt"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(CheckpointException, match=f"another save into this folder is running \\(pid {holder.pid} "):
            save(path, A, SHARDED, overwrite=False)
    finally:
        holder.kill()
        holder.join()
    save(path, A, SHARDED, overwrite=False)  # the dead holder's lock is stale: taken over
    assert load_dcp_hf(path) == "A"
    assert not os.path.exists(commit.lock_path(str(path)))


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "ckpt"
    dead = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    with open(commit.lock_path(str(path)), "w") as f:
        json.dump({"pid": dead.pid, "host": os.uname().nodename, "save_id": "x", "since": 0}, f)
    save(path, A, SHARDED, overwrite=False)
    assert load_dcp_hf(path) == "A"
    assert not os.path.exists(commit.lock_path(str(path)))


def test_a_tensor_named_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointException, match="'__metadata__': the name is reserved"):
        dcp.save(
            {"__metadata__": torch.zeros(2)},
            storage_writer=HFStorageWriter(tmp_path / "x"),
            planner=HFSavePlanner(),
            no_dist=True,
        )
    assert not (tmp_path / "x").exists()


def test_errors_are_dcp_hf_errors(tmp_path):
    with pytest.raises(CheckpointException) as info:
        load_dcp_hf(tmp_path / "absent")
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, DcpHfError) and "no such checkpoint folder" in str(error)


def _move_child(src, dst, env):
    from dcp_hf.torchtitan import move_checkpoint

    os.environ.update(env)
    commit.reset_steps()
    move_checkpoint(src, dst)
    os._exit(0)


def move_in_child(src, dst, env) -> int:
    return in_child(_move_child, src, dst, env)


def test_torchtitan_move_killed_at_every_step_leaves_no_checkpoint_or_the_whole_one(tmp_path):
    """torchtitan's consolidation under dcp-hf (``dcp_hf.torchtitan``) moves ``step-N/sharded`` to
    ``step-N``: killed at any step, ``step-N`` holds no index or the whole new checkpoint (what
    torchtitan's ``_find_load_step`` tells apart), and the next save into it cleans up."""
    log = tmp_path / "steps.log"
    save(tmp_path / "count" / "sharded", B, SHARDED)
    assert (
        move_in_child(str(tmp_path / "count" / "sharded"), str(tmp_path / "count"), {"DCP_HF_STEP_LOG": str(log)}) == 0
    )
    steps = len(log.read_text().splitlines())
    assert load_dcp_hf(tmp_path / "count") == "B"
    seen = []
    for k in range(1, steps + 2):
        step_dir = tmp_path / f"step-{k}"
        save(step_dir / "sharded", B, SHARDED)
        code = move_in_child(str(step_dir / "sharded"), str(step_dir), {"DCP_HF_KILL_AT": str(k)})
        assert code == (0 if k > steps else -9), (k, code)
        if (step_dir / "model.safetensors.index.json").exists():
            assert (load_dcp_hf(step_dir), load_transformers(step_dir)) == ("B", "B"), k
            seen.append("B")
        else:
            seen.append("none")
        save(step_dir, B, SHARDED)  # the next save into the folder finishes what was left
        assert [e for e in os.listdir(tmp_path) if e.startswith(f".step-{k}.")] == []
    assert seen[0] == "none" and seen[-1] == "B"


def training(seed: int) -> dict:
    """A training checkpoint's state: the model's weights, Adam moments under their names, a
    step counter and a value that is not a tensor."""
    g = torch.Generator().manual_seed(100 + seed)
    model = weights(seed)
    moments = {
        k: {"exp_avg": torch.randn(v.shape, generator=g), "step": torch.tensor(float(seed))} for k, v in model.items()
    }
    return {"model": model, "optimizer": {"state": moments}, "train_state": {"step": seed}}


TA, TB = training(1), training(2)


def save_training(path, state, max_shard_size, overwrite=True):
    save(path, state, max_shard_size, overwrite, planner=HFSavePlanner(model_prefix="model."))


def _training_child(path, env):
    os.environ.update(env)
    commit.reset_steps()
    save_training(path, TB, SHARDED)
    os._exit(0)


def which_training(path) -> str:
    state = {
        "model": {k: torch.zeros_like(v) for k, v in A.items()},
        "optimizer": {"state": {k: {"exp_avg": torch.zeros_like(v), "step": torch.tensor(0.0)} for k, v in A.items()}},
        "train_state": {"step": None},
    }
    dcp.load(state, storage_reader=HFStorageReader(path), planner=HFLoadPlanner(model_prefix="model."), no_dist=True)
    for name, ref in (("A", TA), ("B", TB)):
        same = state["train_state"] == ref["train_state"] and all(
            torch.equal(state["model"][k], ref["model"][k])
            and torch.equal(state["optimizer"]["state"][k]["exp_avg"], ref["optimizer"]["state"][k]["exp_avg"])
            and torch.equal(state["optimizer"]["state"][k]["step"], ref["optimizer"]["state"][k]["step"])
            for k in ref["model"]
        )
        if same:
            return name
    return "mix"


def test_training_checkpoint_killed_at_every_commit_step_is_old_or_new(tmp_path):
    """The model and its training state commit together: killed at any step, the folder holds
    the old weights with the old optimizer state, or the new with the new, never a mix."""
    log = tmp_path / "steps.log"
    save_training(tmp_path / "count", TA, SHARDED, overwrite=False)
    assert in_child(_training_child, str(tmp_path / "count"), {"DCP_HF_STEP_LOG": str(log)}) == 0
    steps_log = log.read_text()
    assert "training_state" in steps_log  # the training state's files are in the commit
    steps = len(steps_log.splitlines())
    seen = []
    for k in range(1, steps + 2):
        path = tmp_path / f"k{k}"
        save_training(path, TA, SHARDED, overwrite=False)
        code = in_child(_training_child, str(path), {"DCP_HF_KILL_AT": str(k)})
        assert code == (0 if k > steps else -9), (k, code)
        got = which_training(path), load_transformers(path)
        assert got in (("A", "A"), ("B", "B")), (k, got)
        seen.append(got[0])
    assert seen[0] == "A" and seen[-1] == "B"
