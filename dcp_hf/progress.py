"""Opt-in progress bar (bytes, GB/s) and a one-line throughput summary in the log."""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("dcp_hf")


class Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self._bar = None
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc)
        self._lock = threading.Lock()
        self.start = time.perf_counter()

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def log_throughput(what: str, nbytes: int, seconds: float, where: str) -> None:
    rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    logger.info("%s %.3f GB in %.2f s (%.2f GB/s): %s", what, nbytes / 1e9, seconds, rate, where)
