"""Progress bars (bytes, GB/s) on the coordinator, and a one-line throughput summary in the log.

Every rank writes (or reads) its own share at the same time; only the coordinator draws a bar.
Its bar counts all ranks' bytes: the checkpoint's total is known from the plan on every rank,
and the coordinator advances the bar by its own progress scaled to that total (exact when the
shares are balanced, as DTensor and Megatron shardings are); it ends at the exact total.
"""

from __future__ import annotations

import logging
import threading
import time

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
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                             dynamic_ncols=True)
        self._lock = threading.Lock()
        self._done = 0.0
        self.start = time.perf_counter()

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
