"""A save never moves or changes the folder it saves into, nor any file it did not write
(issue 24, case 7): the folder keeps its inode, owner and mode, so a process working in it
goes on working; subfolders and other users' files are never moved or linked, so read-only
ones and protected hard links do not fail a save; and no name longer than the folder's own is
made beside it. The cases that need an unprivileged user run the save in a forked process as
``nobody`` (these tests run as root, whom permissions do not stop)."""

import os
import shutil
import stat
import tempfile

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from tests.test_atomic import SHARDED, SINGLE, A, B, in_child, load_dcp_hf, load_transformers, save

NOBODY = 65534


def test_saves_keep_the_folder_itself(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    os.chmod(path, 0o2770)  # a shared folder's mode: setgid, group-writable
    before = os.stat(path)
    for state, size in ((A, SHARDED), (B, SINGLE), (A, SHARDED), (B, SHARDED)):
        save(path, state, size)
        now = os.stat(path)
        assert (now.st_ino, now.st_dev, now.st_uid, now.st_gid, now.st_mode) == (
            before.st_ino,
            before.st_dev,
            before.st_uid,
            before.st_gid,
            before.st_mode,
        )
    assert (load_dcp_hf(path), load_transformers(path)) == ("B", "B")


def _work_in_the_folder(path):
    os.chdir(path)
    save(path, A, SHARDED)
    with open("train.log", "w") as f:  # relative to the working directory: the folder
        f.write("step 1\n")
    save(path, B, SHARDED)
    with open("train.log", "a") as f:
        f.write("step 2\n")
    os._exit(0)


def test_a_process_working_in_the_folder_saves_twice_and_writes_between(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    assert in_child(_work_in_the_folder, str(path)) == 0
    assert (path / "train.log").read_text() == "step 1\nstep 2\n"
    assert (load_dcp_hf(path), load_transformers(path)) == ("B", "B")


@pytest.mark.parametrize("length", [240, 255])
def test_folder_names_up_to_the_longest_save(tmp_path, length):
    path = tmp_path / ("c" * length)
    save(path, A, SHARDED, overwrite=False)
    save(path, B, SINGLE)
    assert (load_dcp_hf(path), load_transformers(path)) == ("B", "B")
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no lock or other file left beside it


@pytest.fixture
def shared():
    """A folder ``nobody`` can reach (pytest's tmp_path is root's alone), owned by nobody."""
    base = tempfile.mkdtemp(prefix="dcp-hf-shared-")
    os.chmod(base, 0o755)
    os.chown(base, NOBODY, NOBODY)
    yield base
    shutil.rmtree(base)


def _as_nobody(target, *args):
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:
        target(*args)
    except BaseException as e:  # noqa: BLE001 - the parent sees the exit code; print why
        print(f"save as nobody failed: {type(e).__name__}: {e}", flush=True)
        os._exit(1)
    os._exit(0)


def save_as_nobody(path, state, size) -> int:
    return in_child(_as_nobody, save, path, state, size)


def test_a_read_only_subfolder_does_not_fail_a_save(shared):
    path = os.path.join(shared, "ckpt")
    assert save_as_nobody(path, A, SHARDED) == 0
    tokenizer = os.path.join(path, "tokenizer")
    os.mkdir(tokenizer)
    with open(os.path.join(tokenizer, "tokenizer.json"), "w") as f:
        f.write("{}")
    os.chown(tokenizer, NOBODY, NOBODY)
    os.chmod(tokenizer, 0o555)  # the user's read-only subfolder (root still writes it: nobody cannot)
    inode = os.stat(tokenizer).st_ino
    assert save_as_nobody(path, B, SHARDED) == 0
    assert (load_dcp_hf(path), load_transformers(path)) == ("B", "B")
    assert os.stat(tokenizer).st_ino == inode and stat.S_IMODE(os.stat(tokenizer).st_mode) == 0o555
    assert open(os.path.join(tokenizer, "tokenizer.json")).read() == "{}"


@pytest.mark.skipif(
    not os.path.exists("/proc/sys/fs/protected_hardlinks") or open("/proc/sys/fs/protected_hardlinks").read() != "1\n",
    reason="needs fs.protected_hardlinks=1 (Linux's default)",
)
def test_a_file_of_another_user_in_the_folder_does_not_fail_a_save(shared):
    """With protected hard links, nobody cannot link root's file: a save that linked or moved
    the folder's other files would fail; it neither links nor moves them."""
    path = os.path.join(shared, "ckpt")
    assert save_as_nobody(path, A, SHARDED) == 0
    os.chmod(path, 0o777)  # a folder shared by several users
    theirs = os.path.join(path, "their_notes.txt")
    with open(theirs, "w") as f:
        f.write("root's own file")
    os.chmod(theirs, 0o644)
    assert save_as_nobody(path, B, SHARDED) == 0
    assert (load_dcp_hf(path), load_transformers(path)) == ("B", "B")
    assert open(theirs).read() == "root's own file" and os.stat(theirs).st_uid == 0


def test_the_user_file_at_a_fresh_shard_name_is_not_replaced(tmp_path):
    """A save names its shards with names no file has; a file that appears at one during the
    save is refused, naming it, and the old checkpoint stays."""
    from dcp_hf.storage import commit

    path = tmp_path / "ckpt"
    save(path, A, SHARDED, overwrite=False)
    place = commit.place

    def squatted(src, dst):
        if not os.path.exists(tmp_path / "squatted"):
            (tmp_path / "squatted").write_text("")
            with open(dst, "w") as f:
                f.write("the user's file")
        place(src, dst)

    commit.place = squatted
    try:
        with pytest.raises(CheckpointException) as info:
            save(path, B, SHARDED)
    finally:
        commit.place = place
    ((error, _),) = info.value.failures.values()
    assert "appeared during the save; not replacing it" in str(error)
    assert (load_dcp_hf(path), load_transformers(path)) == ("A", "A")
    squatter = [n for n in os.listdir(path) if n.startswith("model-") and n.count("-") == 4]
    assert len(squatter) == 1 and (path / squatter[0]).read_text() == "the user's file"
