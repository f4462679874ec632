"""The writer resolves chunks ahead of the one it writes (a transpose or cast of the next chunks
runs beside the writes): the order, the errors and an early exit stay as without it."""

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
