"""Reading HF checkpoints from a real S3 server (SeaweedFS on 127.0.0.1, started here)."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.local_ranks import run_ranks
from tests.cli_driver import run_cli
from tests.workers import bitwise_equal, load_from_url, reference_state

pytestmark = pytest.mark.slow  # every test here starts processes, a server or Megatron models


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """Our multi-file checkpoint and a plain safetensors.save_file one, uploaded by boto3."""
    root = tmp_path_factory.mktemp("s3src")
    sd = reference_state()
    dcp.save(
        sd, storage_writer=HFStorageWriter(root / "ours", max_shard_size=600), planner=HFSavePlanner(), no_dist=True
    )
    (root / "plain").mkdir()
    save_file(sd, root / "plain" / "model.safetensors")
    bucket = s3.bucket("dcp-hf-read")
    return {name: s3.upload_folder(root / name, bucket, f"ckpt/{name}") for name in ("ours", "plain")}


@pytest.mark.parametrize("name", ["ours", "plain"])
def test_load_from_s3_in_one_process(s3, uploaded, name):
    sd = reference_state()
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    reader = HFStorageReader(uploaded[name], storage_options=s3.storage_options)
    dcp.load(out, storage_reader=reader, planner=HFLoadPlanner(), no_dist=True)
    assert all(bitwise_equal(out[k], sd[k]) for k in sd)


@pytest.mark.parametrize("kind,world", [("shard1", 3), ("mixed", 2)])
def test_load_from_s3_resharded(s3, uploaded, kind, world):
    assert run_ranks(load_from_url, world, uploaded["ours"], kind, s3.storage_options) == [[]] * world


def test_inspect_an_s3_checkpoint_with_the_standard_credential_chain(s3, uploaded):
    env = {**os.environ, **s3.env}
    done = run_cli("inspect", "-v", uploaded["ours"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "model.embed_tokens.weight  BF16  [37, 16]" in out
    assert "total: 9 tensors in" in out
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in out


def test_missing_object_named_by_the_index_is_an_error(s3, uploaded):
    bucket, prefix = uploaded["ours"].removeprefix("s3://").split("/", 1)
    import json

    index = json.loads(s3.client.get_object(Bucket=bucket, Key=f"{prefix}/model.safetensors.index.json")["Body"].read())
    victim = index["weight_map"]["model.scale"]
    s3.client.copy_object(
        Bucket=bucket, Key=f"broken/{victim}x", CopySource={"Bucket": bucket, "Key": f"{prefix}/{victim}"}
    )
    s3.client.put_object(Bucket=bucket, Key="broken/model.safetensors.index.json", Body=json.dumps(index).encode())
    with pytest.raises(
        CheckpointException, match=f"s3://{bucket}/broken/{victim}: named by model.safetensors.index.json but missing"
    ):
        dcp.load(
            {"model.scale": torch.zeros(())},
            storage_reader=HFStorageReader(f"s3://{bucket}/broken", storage_options=s3.storage_options),
            planner=HFLoadPlanner(allow_unexpected=True),
            no_dist=True,
        )


# -- writing -------------------------------------------------------------------------------
def _objects(s3, bucket, prefix):
    listing = s3.client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return sorted(o["Key"].removeprefix(prefix + "/") for o in listing.get("Contents", []))


def _download(s3, bucket, prefix):
    from safetensors.torch import load

    tensors = {}
    for name in _objects(s3, bucket, prefix):
        if name.endswith(".safetensors"):
            tensors.update(load(s3.client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()))
    return tensors


def _open_uploads(s3, bucket):
    return s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture
def s3_env(s3, monkeypatch):
    """Credentials and endpoint through the standard AWS environment (spawned ranks inherit it)."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def test_save_to_s3_in_one_process(s3):
    bucket = s3.bucket("dcp-hf-one")
    sd = reference_state()
    dcp.save(
        sd,
        storage_writer=HFStorageWriter(f"s3://{bucket}/ckpt", storage_options=s3.storage_options),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    assert _objects(s3, bucket, "ckpt") == ["model.safetensors"]
    got = _download(s3, bucket, "ckpt")
    assert all(bitwise_equal(got[k], sd[k]) for k in sd)
    with pytest.raises(CheckpointException, match="already holds a checkpoint"):
        dcp.save(
            sd,
            storage_writer=HFStorageWriter(f"s3://{bucket}/ckpt", storage_options=s3.storage_options),
            planner=HFSavePlanner(),
            no_dist=True,
        )


@pytest.mark.parametrize("kind,world", [("shard0", 3), ("shard1", 3), ("replicate", 2), ("mixed", 2)])
def test_save_to_s3_from_every_rank(s3_env, kind, world):
    from tests.workers import save_to_url

    s3 = s3_env
    bucket = s3.bucket(f"dcp-hf-{kind}")
    run_ranks(save_to_url, world, f"s3://{bucket}/ckpt", kind, {"max_shard_size": 600}, None)
    names = _objects(s3, bucket, "ckpt")
    n = len(names) - 1
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + [
        "model.safetensors.index.json"
    ]
    sd, got = reference_state(), _download(s3, bucket, "ckpt")
    assert got.keys() == sd.keys() and all(bitwise_equal(got[k], sd[k]) for k in sd)
    assert _open_uploads(s3, bucket) == []
    # and it reads back, resharded, through our reader
    assert run_ranks(load_from_url, 2, f"s3://{bucket}/ckpt", "shard1", None) == [[], []]


@pytest.mark.parametrize("kind", ["shard0", "shard1"])
def test_multipart_parts_over_several_rounds(s3_env, kind):
    """A 12 MB tensor in 5 MiB parts, with a round budget that forces several exchanges."""
    from tests.workers import save_big_to_url

    s3 = s3_env
    bucket = s3.bucket(f"dcp-hf-parts-{kind}")
    run_ranks(save_big_to_url, 3, f"s3://{bucket}/big", kind, 12_000_000, {"part_size": "5MiB", "round_bytes": "6MiB"})
    got = _download(s3, bucket, "big")["big"]
    assert torch.equal(got, torch.arange(got.numel(), dtype=torch.float32).view(-1, 64))
    assert _open_uploads(s3, bucket) == []


def test_failed_save_to_s3_leaves_no_object_and_no_upload(s3_env):
    from tests.workers import save_with_fault

    s3 = s3_env
    bucket = s3.bucket("dcp-hf-fail")
    results = run_ranks(save_with_fault, 3, f"s3://{bucket}/ckpt", "raise", 0, False)
    for status, message, _ in results:
        assert status == "error", message
    assert any("injected failure while writing 'model.embed_tokens.weight'" in m for _, m, _ in results)
    assert _objects(s3, bucket, "ckpt") == [] and _open_uploads(s3, bucket) == []


def test_fused_experts_to_s3_through_a_layout(s3_env, tmp_path):
    from tests.moe_models import tiny_moe
    from tests.workers import fused_experts_round_trip

    s3 = s3_env
    bucket = s3.bucket("dcp-hf-experts")
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "hf")
    assert run_ranks(fused_experts_round_trip, 4, str(tmp_path / "hf"), f"s3://{bucket}") == [{}] * 4
    original = load_file_dict(tmp_path / "hf" / "model.safetensors")
    for kind in ("experts", "2d"):
        got = _download(s3, bucket, kind)
        assert got.keys() == original.keys() and all(torch.equal(got[k], original[k]) for k in original)


def load_file_dict(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_s3_server_stopped_mid_upload(monkeypatch):
    """Every rank fails within a bounded time, nothing is committed, and the uploads the save
    could not abort (the server was gone) are aborted by the next save into the same path."""
    from testkit.s3_server import SeaweedS3
    from tests.workers import save_to_url, save_while_server_dies

    server = SeaweedS3()
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        bucket = server.bucket("dcp-hf-dies")
        results = run_ranks(save_while_server_dies, 2, f"s3://{bucket}/ckpt", server.proc.pid, timeout=240)
        assert all(status == "error" for status, _, _ in results), results
        assert all(seconds < 180 for _, _, seconds in results), results
        server.start()  # same data, same ports
        assert _objects(server, bucket, "ckpt") == []
        run_ranks(save_to_url, 2, f"s3://{bucket}/ckpt", "shard0", {"max_shard_size": 600}, None)
        assert _open_uploads(server, bucket) == []
        got, sd = _download(server, bucket, "ckpt"), reference_state()
        assert all(bitwise_equal(got[k], sd[k]) for k in sd)
    finally:
        server.stop()


def _through_proxy(s3, monkeypatch, rule):
    from tests.throttle_proxy import ThrottlingProxy

    proxy = ThrottlingProxy(s3.endpoint, rule)
    for k, v in {**s3.env, "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(k, v)  # spawned ranks inherit the environment
    return proxy


def test_throttled_server_save_and_load_succeed(s3, monkeypatch):
    """Every 4th GET and PUT answered 503 SlowDown (a busy bucket): the multipart save, the
    index and headers, and the resharded ranged reads retry with backoff; bit-exact results."""
    from tests.throttle_proxy import every
    from tests.workers import save_to_url

    bucket = s3.bucket("dcp-hf-throttled")
    proxy = _through_proxy(s3, monkeypatch, every(4))
    try:
        run_ranks(save_to_url, 2, f"s3://{bucket}/ckpt", "shard1", {"max_shard_size": 600}, None)
        assert run_ranks(load_from_url, 2, f"s3://{bucket}/ckpt", "shard0", None) == [[], []]
        assert proxy.throttled >= 5, proxy.throttled
    finally:
        proxy.stop()
    assert _open_uploads(s3, bucket) == []
    got, sd = _download(s3, bucket, "ckpt"), reference_state()
    assert got.keys() == sd.keys() and all(bitwise_equal(got[k], sd[k]) for k in sd)


def test_throttling_that_never_ends_fails_every_rank_cleanly(s3, monkeypatch):
    """Every part upload refused: every rank fails with the reason, and the save leaves no
    object and no open multipart upload."""
    from tests.workers import save_with_fault

    bucket = s3.bucket("dcp-hf-always-throttled")
    proxy = _through_proxy(s3, monkeypatch, lambda method, path, query: method == "PUT" and "partNumber" in query)
    try:
        results = run_ranks(save_with_fault, 2, f"s3://{bucket}/ckpt", "none", 0, False, timeout=240)
    finally:
        proxy.stop()
    assert all(status == "error" for status, *_ in results), results
    assert any("SlowDown" in message for _, message, _ in results), results
    assert _objects(s3, bucket, "ckpt") == [] and _open_uploads(s3, bucket) == []
