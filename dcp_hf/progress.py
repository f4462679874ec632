"""Progress bars (bytes, GB/s) on the coordinator, and a one-line throughput summary in the log.

Every rank writes (or reads) its own share at the same time; only the coordinator draws a bar.
Its bar counts all ranks' bytes: the checkpoint's total is known from the plan on every rank,
and the coordinator advances the bar by its own progress scaled to that total (exact when the
shares are balanced, as DTensor and Megatron shardings are); it ends at the exact total.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("dcp_hf")


class Progress:
    """``total``: all ranks' bytes; ``own``: this rank's (the bar advances by ``total/own``
    per own byte)."""

    def __init__(self, enabled: bool, total: int, desc: str, own: int | None = None):
        self._bar = None
        self._scale = total / own if own else 1.0
        self._total = total
        if enabled and total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._done = 0.0

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                before = int(self._done)
                self._done = min(self._total, self._done + nbytes * self._scale)
                self._bar.update(int(self._done) - before)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._total - int(self._done))  # the coordinator's share is done
            self._bar.close()


def log_throughput(what: str, nbytes: int, seconds: float, where: str) -> None:
    rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    logger.info("%s %.3f GB in %.2f s (%.2f GB/s): %s", what, nbytes / 1e9, seconds, rate, where)


def _tensor_bytes(item) -> int:
    from dcp_hf.format.dtypes import itemsize

    td = item.tensor_data
    return td.chunk.sizes.numel() * itemsize(td.properties.dtype) if td is not None else 0


class _CountingPlanner:
    """A save planner whose resolved data advances a progress bar (DCP's writers resolve an
    item's data when they write it)."""

    def __init__(self, planner, progress: Progress):
        self._planner, self._progress = planner, progress

    def resolve_data(self, item):
        data = self._planner.resolve_data(item)
        self._progress.update(_tensor_bytes(item))
        return data

    def __getattr__(self, name):
        return getattr(self._planner, name)


def file_system_writer(path, *, progress: bool = False, **kwargs):
    """DCP's ``FileSystemWriter`` with a progress bar on the coordinator counting every rank's
    bytes (the coordinator sums them from all ranks' plans)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class _Writer(FileSystemWriter):
        total = 0

        def set_up_storage_writer(self, is_coordinator: bool, *args, **kw) -> None:
            super().set_up_storage_writer(is_coordinator, *args, **kw)
            self.is_coordinator = is_coordinator

        def prepare_global_plan(self, plans):
            self.total = sum(_tensor_bytes(i) for p in plans for i in p.items)
            return super().prepare_global_plan(plans)

        def write_data(self, plan, planner):
            own = sum(_tensor_bytes(i) for i in plan.items)
            bar = Progress(
                progress and getattr(self, "is_coordinator", False), self.total or own, "dcp-hf save", own=own
            )
            try:
                return super().write_data(plan, _CountingPlanner(planner, bar))
            finally:
                bar.close()

    return _Writer(path, **kwargs)
