"""Reading HF checkpoints from a real S3 server (SeaweedFS on 127.0.0.1, started here)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter
from dcp_hf.testing import run_ranks
from tests.workers import bitwise_equal, load_from_url, reference_state


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """Our multi-file checkpoint and a plain safetensors.save_file one, uploaded by boto3."""
    root = tmp_path_factory.mktemp("s3src")
    sd = reference_state()
    dcp.save(sd, storage_writer=HFStorageWriter(root / "ours", max_shard_size=600),
             planner=HFSavePlanner(), no_dist=True)
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
    out = subprocess.run([sys.executable, "-m", "dcp_hf", "inspect", "-v", uploaded["ours"]],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "model.embed_tokens.weight  BF16  [37, 16]" in out
    assert "total: 9 tensors in" in out
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in out


def test_missing_object_named_by_the_index_is_an_error(s3, uploaded):
    bucket, prefix = uploaded["ours"].removeprefix("s3://").split("/", 1)
    import json
    index = json.loads(s3.client.get_object(Bucket=bucket, Key=f"{prefix}/model.safetensors.index.json")["Body"].read())
    victim = index["weight_map"]["model.scale"]
    s3.client.copy_object(Bucket=bucket, Key=f"broken/{victim}x", CopySource={"Bucket": bucket, "Key": f"{prefix}/{victim}"})
    s3.client.put_object(Bucket=bucket, Key="broken/model.safetensors.index.json", Body=json.dumps(index).encode())
    with pytest.raises(CheckpointException, match=f"s3://{bucket}/broken/{victim}: named by model.safetensors.index.json but missing"):
        dcp.load({"model.scale": torch.zeros(())}, storage_reader=HFStorageReader(
            f"s3://{bucket}/broken", storage_options=s3.storage_options),
            planner=HFLoadPlanner(allow_unexpected=True), no_dist=True)
