"""Simulated downstream services for MAX_THREAD_COUNT = "auto": the workloads of issue 14.

Shared by the real-broker test (tests/test_autothreads_e2e.py) and the benchmark (bench/autotune.py).

:class:`DegradingService` is the issue's service: ``slots`` calls served at once, each taking
``latency`` seconds -- stretched to ``latency x (1 + excess / slots)`` when more than ``slots`` calls are
outstanding (``excess`` = outstanding calls beyond ``slots``, counted when a call gets its slot). So
one call too many makes every call slower: the issue measured 10 threads 495 msg/s, 20 threads 992,
40 threads 499 and 75 threads 266. :func:`burn` is a CPU-bound handler's work. Any thread may call.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class DegradingService:
    """``slots`` at once, ``latency`` each, slower for everyone when more than ``slots`` calls are outstanding."""

    def __init__(self, slots: int = 20, latency: float = 0.02) -> None:
        if slots < 1 or latency <= 0:
            raise ValueError(f"slots must be >= 1 and latency > 0, got {slots}, {latency}")
        self.slots = slots
        self.latency = latency
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._outstanding = 0
        self.calls = 0

    def call(self) -> float:
        """One request; returns the seconds it was served for (its wait for a slot not included)."""
        with self._lock:
            self._outstanding += 1
        try:
            with self._slots:
                excess = max(0, self._outstanding - self.slots)
                served = self.latency * (1 + excess / self.slots)
                time.sleep(served)
        finally:
            with self._lock:
                self._outstanding -= 1
                self.calls += 1
        return served

    def handler(self, _message: Any) -> None:
        """A consumer handler that makes one call per message."""
        self.call()


def burn(seconds: float) -> None:
    """Hold the GIL and a core for about ``seconds`` (a CPU-bound handler's work)."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i
