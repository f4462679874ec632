"""What a save overlaps with its writes: the writer resolves chunks ahead of the one it writes
(a transpose or cast of the next chunks runs beside the writes) with the order, the errors and an
early exit as without it; the local sink hands finished spans to the disk as it goes."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from dcp_hf.errors import StateDictMismatchError
from dcp_hf.storage.writer import RESOLVE_AHEAD, resolved_ahead


def _chunks(n):
    return [
        SimpleNamespace(
            item=SimpleNamespace(
                index=SimpleNamespace(fqn=f"t{i}"),
                tensor_data=SimpleNamespace(chunk=SimpleNamespace(sizes=torch.Size([2]))),
            ),
            number=i,
        )
        for i in range(n)
    ]


class _Planner:
    """Resolves chunk i to [i, i]; records which threads resolve and how many at once."""

    def __init__(self, fail_at=None, delay=0.0):
        self.fail_at, self.delay = fail_at, delay
        self.lock = threading.Lock()
        self.running = self.most_at_once = 0
        self.resolved = []

    def resolve_data(self, item):
        i = int(item.index.fqn[1:])
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
            self.resolved.append(i)
        if i == self.fail_at:
            return "not a tensor"
        return torch.full((2,), float(i))


def test_chunks_come_in_order_resolved_concurrently():
    planner = _Planner(delay=0.05)
    out = [(c.number, t.tolist()) for c, t in resolved_ahead(planner, _chunks(7))]
    assert out == [(i, [float(i), float(i)]) for i in range(7)]
    assert planner.most_at_once == RESOLVE_AHEAD  # the next chunks resolve at once


def test_an_error_comes_at_its_chunks_turn_and_later_chunks_are_not_resolved():
    planner = _Planner(fail_at=2)
    got = []
    with pytest.raises(StateDictMismatchError, match="'t2': the planner returned no tensor"):
        for c, _ in resolved_ahead(planner, _chunks(50)):
            got.append(c.number)
    assert got == [0, 1]
    assert max(planner.resolved) <= 2 + RESOLVE_AHEAD  # nothing far ahead was resolved


def test_an_early_exit_cancels_what_has_not_started():
    planner = _Planner(delay=0.02)
    gen = resolved_ahead(planner, _chunks(50))
    next(gen)
    gen.close()  # e.g. a write failed: the stager closes the run
    assert planner.running == 0  # running resolves were waited for
    assert len(planner.resolved) <= 1 + RESOLVE_AHEAD + 1


def test_interleaved_spans_are_handed_to_the_disk_only_after_the_lag(monkeypatch):
    """A column shard's span (other ranks' runs between this rank's) goes to writeback only once
    this rank has written WRITEBACK_LAG bytes more, oldest first; a span of its own at once."""
    from dcp_hf.boxes import RunGrid
    from dcp_hf.storage import local

    calls = []
    monkeypatch.setattr(local, "start_writeback", lambda fd, lo, n: calls.append((lo, lo + n)))
    monkeypatch.setattr(local, "write_runs", lambda *a: None)
    sink = local.LocalSink("unused")
    sink.WRITEBACK_LAG = 300
    sink.fds = {0: -1}
    strided = RunGrid(start=0, run_len=50, counts=(2,), strides=(100,))  # 100 bytes in [0, 150)
    for i in range(4):
        sink.write_runs(0, i * 1000, strided, memoryview(b""))
    assert calls == [(0, 150)]  # written 400 bytes: only the first span is 300 behind
    sink.write_runs(0, 9000, RunGrid(start=0, run_len=120), memoryview(b""))  # its own span
    assert calls == [(0, 150), (9000, 9120)]
    sink.write_runs(0, 5000, strided, memoryview(b""))
    sink.write_runs(0, 6000, strided, memoryview(b""))
    assert calls[2:] == [(1000, 1150), (2000, 2150)]
