"""Object stores (real SeaweedFS S3 on 127.0.0.1): no rename, so a save killed at any step of
its commit leaves the old checkpoint, the new one, or a folder every reader refuses naming a
file of another save; an object replaced between the header read and the data read is an
error (ETag pinned with If-Match); a frozen server is an error naming the URL, not a hang; a
missing bucket is a clear error."""

import multiprocessing
import os
import socket
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import DcpHfError
from dcp_hf.storage import commit
from tests.test_consistency import A, B, which

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models

SHARDED, SINGLE = 3200, 10**9  # 3 files of two tensors, or one file


def save(url, state, options, max_shard_size=SHARDED, overwrite=True):
    dcp.save(
        state,
        storage_writer=HFStorageWriter(
            url, max_shard_size=max_shard_size, overwrite=overwrite, storage_options=options
        ),
        planner=HFSavePlanner(),
        no_dist=True,
    )


def load(url, options) -> str:
    state = {k: torch.zeros_like(v) for k, v in A.items()}
    dcp.load(state, storage_reader=HFStorageReader(url, storage_options=options), planner=HFLoadPlanner(), no_dist=True)
    return which(state)


def _save_b(url, options, max_shard_size, env):
    os.environ.update(env)
    commit.reset_steps()
    save(url, B, options, max_shard_size)
    os._exit(0)


def _fork_each(jobs, codes):
    """In a fresh (spawned) process, where no s3fs or botocore thread runs yet: fork one child
    per job (all at once: each mostly waits on the server), and report how each ended."""
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_save_b, args=job) for job in jobs]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        if child.is_alive():
            child.kill()
            child.join()
            codes.put("hung")
        else:
            codes.put(child.exitcode)


def save_b_in_children(jobs) -> list:
    ctx = multiprocessing.get_context("spawn")
    codes = ctx.Queue()
    helper = ctx.Process(target=_fork_each, args=(jobs, codes))
    helper.start()
    out = [codes.get(timeout=300) for _ in jobs]
    helper.join(60)
    return out


@pytest.mark.parametrize("b_size", [SHARDED, SINGLE], ids=["sharded-to-sharded", "sharded-to-single"])
def test_s3_save_killed_at_every_commit_step_leaves_old_new_or_refused(s3, b_size):
    bucket = s3.bucket(f"dcp-hf-kill-{'one' if b_size == SINGLE else 'shards'}")
    options = s3.storage_options
    urls = [f"s3://{bucket}/k{k}" for k in range(1, 9)]  # more kill points than commit steps
    for url in urls:
        save(url, A, options, overwrite=False)
    codes = save_b_in_children([(url, options, b_size, {"DCP_HF_KILL_AT": str(k)}) for k, url in enumerate(urls, 1)])
    steps = codes.count(-9)
    assert steps >= 4 and codes == [-9] * steps + [0] * (len(urls) - steps), codes
    outcomes = []
    for url in urls:
        try:
            outcomes.append(load(url, options))
        except CheckpointException as e:
            ((error, _),) = e.failures.values()
            assert isinstance(error, DcpHfError), repr(error)
            assert (
                "written by save" in str(error)
                and f"{url}/model-" in str(error)
                or "files of different saves: model-" in str(error)
            ), error
            outcomes.append("refused")
        save(url, B, options, b_size)  # the next save commits whatever was left
        assert load(url, options) == "B"
    assert "mix" not in outcomes, outcomes
    assert outcomes[0] == "A" and outcomes[-1] == "B"
    # New shards get names no object has and the index comes last: no step is refused (before
    # fresh names, the same names replaced one by one were refused by the save ids).
    assert "refused" not in outcomes, outcomes


def test_an_object_replaced_after_its_header_was_read_is_refused(s3):
    bucket = s3.bucket("dcp-hf-etag")
    options = s3.storage_options
    save(f"s3://{bucket}/a", A, options, overwrite=False)
    reader = HFStorageReader(f"s3://{bucket}/a", storage_options=options)
    reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))
    victim = min(reader.weight_map.values())
    data = bytearray(s3.client.get_object(Bucket=bucket, Key=f"a/{victim}")["Body"].read())
    data[-1] ^= 0xFF  # the same header, one data byte changed: only the ETag pin can tell
    s3.client.put_object(Bucket=bucket, Key=f"a/{victim}", Body=bytes(data))
    from tests.test_consistency import load_from

    with pytest.raises(DcpHfError, match=f"s3://{bucket}/a/{victim}: replaced while being read"):
        load_from(reader)


class FrozenServer:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for c in self.conns:
            c.close()
        self.sock.close()


def _in_thread(fn):
    """Run ``fn`` in a thread, bounded: a hang fails the test instead of the suite."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(180)
    if thread.is_alive():
        pytest.fail("hung")
    return box


def test_a_frozen_server_is_an_error_naming_the_url_not_a_hang():
    server = FrozenServer()
    try:
        options = {
            "key": "k",
            "secret": "s",
            "client_kwargs": {"endpoint_url": server.url},
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 2}},
        }
        for what in ("load", "save"):
            url = f"s3://frozen/{what}"
            if what == "load":
                box = _in_thread(lambda url=url: load(url, options))
            else:
                box = _in_thread(lambda url=url: save(url, A, options))
            assert "error" in box, box
            error = box["error"]
            if isinstance(error, CheckpointException):
                ((error, _),) = error.failures.values()
            assert isinstance(error, DcpHfError), repr(error)
            assert f"s3://frozen/{what}" in str(error), error
            assert "no answer" in str(error) or "timeout" in str(error).lower(), error
    finally:
        server.close()


def test_a_missing_bucket_on_save_is_a_clear_error(s3):
    with pytest.raises(CheckpointException) as info:
        save("s3://dcp-hf-no-such-bucket/ckpt", A, s3.storage_options, overwrite=False)
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, DcpHfError) and "the bucket 'dcp-hf-no-such-bucket' does not exist" in str(error), error
