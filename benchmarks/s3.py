"""Object-storage benchmark against one real S3 server (SeaweedFS on 127.0.0.1, started here):
our save and load next to boto3's TransferManager, raw ranged-GET clients (obstore, boto3)
and s3torchconnector's DCP writer/reader, on the same bytes in the same run."""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from benchmarks.core import build_state, scaled_shape

SAVE_OPS = ["ours", "boto3_upload_file", "s3torchconnector_writer"]
LOAD_OPS = ["ours", "obstore_get_ranges", "boto3_ranged_gets", "s3torchconnector_reader"]
RANGE = 8 << 20


def _boto3():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")


def _s3tc_config():
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)


def _ranges(local_ckpt: str) -> list[tuple[str, int, int]]:
    """(file, start, end) of the 8 MiB ranges covering every checkpoint file's tensor data."""
    from dcp_hf.storage.reader import HFStorageReader

    reader = HFStorageReader(local_ckpt)
    reader.read_metadata()
    reader.load_headers(set(reader.weight_map.values()))
    out = []
    for name, header in reader.headers.items():
        for start in range(header.data_start, header.file_size, RANGE):
            out.append((name, start, min(header.file_size, start + RANGE)))
    return out


def _op(name: str, mode: str, state, bucket: str, world: int, local_ckpt: str):
    import torch.distributed.checkpoint as dcp

    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter

    if mode == "save":
        if name == "ours":
            return lambda: dcp.save(
                state,
                storage_writer=HFStorageWriter(f"s3://{bucket}/ours-w{world}", overwrite=True),
                planner=HFSavePlanner(),
            )
        if name == "boto3_upload_file":
            client = _boto3()
            files = sorted(f for f in os.listdir(local_ckpt))
            return lambda: [client.upload_file(os.path.join(local_ckpt, f), bucket, f"boto3/{f}") for f in files]
        if name == "s3torchconnector_writer":
            from s3torchconnector.dcp import S3StorageWriter

            return lambda: dcp.save(
                state,
                storage_writer=S3StorageWriter(
                    "us-east-1", f"s3://{bucket}/s3tc-w{world}", s3client_config=_s3tc_config(), overwrite=True
                ),
            )
    if name == "ours":
        return lambda: dcp.load(
            state, storage_reader=HFStorageReader(f"s3://{bucket}/ours-w1"), planner=HFLoadPlanner()
        )
    ranges = _ranges(local_ckpt)
    if name == "obstore_get_ranges":
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            bucket, endpoint=os.environ["AWS_ENDPOINT_URL"], region="us-east-1", client_options={"allow_http": True}
        )
        by_file: dict[str, list] = {}
        for f, a, b in ranges:
            by_file.setdefault(f, []).append((a, b))
        return lambda: [
            obstore.get_ranges(store, f"ours-w1/{f}", starts=[a for a, _ in r], ends=[b for _, b in r])
            for f, r in by_file.items()
        ]
    if name == "boto3_ranged_gets":
        client = _boto3()

        def get(r):
            f, a, b = r
            return len(client.get_object(Bucket=bucket, Key=f"ours-w1/{f}", Range=f"bytes={a}-{b - 1}")["Body"].read())

        return lambda: list(ThreadPoolExecutor(16).map(get, ranges))
    if name == "s3torchconnector_reader":
        from s3torchconnector.dcp import S3StorageReader

        return lambda: dcp.load(
            state, storage_reader=S3StorageReader("us-east-1", f"s3://{bucket}/s3tc-w1", s3client_config=_s3tc_config())
        )
    raise ValueError(name)


def _worker(rank, world, mode, shape, layout, ops, bucket, local_ckpt, repeat):
    import torch.distributed as dist

    from benchmarks.measure import measured, rotated

    state = build_state(shape, layout, empty=mode == "load")
    samples = {op: [] for op in ops}
    for r in range(repeat):
        for op in rotated(ops, r):
            dist.barrier()
            samples[op].append(measured(_op(op, mode, state, bucket, world, local_ckpt)))
            dist.barrier()
    return samples


def run(root: str, repeat: int, size_gb: float = 1.0) -> list[dict]:
    from benchmarks.measure import merge_ranks, summarize
    from dcp_hf.local_ranks import run_ranks
    from testkit.s3_server import SeaweedS3

    shape = scaled_shape(size_gb)
    nbytes = sum(math.prod(s) for s in shape.tensors().values()) * 2
    server = SeaweedS3()
    saved_env = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        bucket = server.bucket("dcp-hf-bench")
        local = os.path.join(root, "local")
        from benchmarks.core import write_reference_checkpoint

        write_reference_checkpoint(shape, root)  # the same bytes, on local disk, for boto3
        shutil.move(os.path.join(root, "checkpoint"), local)
        results = []
        for name, mode, world, layout, ops in [
            ("S3 save, 1 process", "save", 1, "full", SAVE_OPS),
            ("S3 save, 2 ranks Shard(0)", "save", 2, "shard0", ["ours", "s3torchconnector_writer"]),
            ("S3 load, 1 process", "load", 1, "full", LOAD_OPS),
        ]:
            print(f"  running: {name} ...", flush=True)
            per_rank = run_ranks(_worker, world, mode, shape, layout, ops, bucket, local, repeat, timeout=3600)
            merged = {op: [merge_ranks([r[op][i] for r in per_rank]) for i in range(repeat)] for op in ops}
            results.append(
                {
                    "case": name,
                    "mode": mode,
                    "world": world,
                    "layout": layout,
                    "state_bytes": nbytes,
                    "ops": {op: summarize(s, nbytes) for op, s in merged.items()},
                }
            )
        return results
    finally:
        server.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
