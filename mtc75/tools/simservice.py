"""Simulated downstream services for MAX_THREAD_COUNT = "auto": the workloads of issue 14.

Shared by the real-broker test (tests/test_autothreads_e2e.py) and the benchmark (bench/autotune.py).

:class:`DegradingService` is the issue's service: ``slots`` calls served at once, each taking
``latency`` seconds -- stretched to ``latency x (1 + excess / slots)`` when more than ``slots`` calls are
outstanding (``excess`` = outstanding calls beyond ``slots``, counted when a call gets its slot). So
one call too many makes every call slower: the issue measured 10 threads 495 msg/s, 20 threads 992,
40 threads 499 and 75 threads 266. :class:`AsyncDegradingService` is the same service for ``async def``
handlers (one event loop calls it). :func:`burn` is a CPU-bound handler's work. Any thread may call,
but an AsyncDegradingService only from the one event loop that first called it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any


class DegradingService:
    """``slots`` at once, ``latency`` each, slower for everyone when more than ``slots`` calls are outstanding."""

    def __init__(self, slots: int = 20, latency: float = 0.02) -> None:
        self.slots, self.latency = _checked(slots, latency)
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
                served = _stretched(self.latency, self.slots, self._outstanding)
                time.sleep(served)
        finally:
            with self._lock:
                self._outstanding -= 1
                self.calls += 1
        return served

    def handler(self, _message: Any) -> None:
        """A consumer handler that makes one call per message."""
        self.call()


class AsyncDegradingService:
    """:class:`DegradingService` for coroutines: the same slots and stretch, awaited instead of slept."""

    def __init__(self, slots: int = 20, latency: float = 0.02) -> None:
        self.slots, self.latency = _checked(slots, latency)
        self._slots: asyncio.Semaphore | None = None  # made on the loop's first call
        self._outstanding = 0
        self.calls = 0

    async def call(self) -> float:
        """One request; returns the seconds it was served for (its wait for a slot not included)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.slots)
        self._outstanding += 1
        try:
            async with self._slots:
                served = _stretched(self.latency, self.slots, self._outstanding)
                await asyncio.sleep(served)
        finally:
            self._outstanding -= 1
            self.calls += 1
        return served

    async def handler(self, _message: Any) -> None:
        """An ``async def`` consumer handler that makes one call per message."""
        await self.call()


def _checked(slots: int, latency: float) -> tuple[int, float]:
    if slots < 1 or latency <= 0:
        raise ValueError(f"slots must be >= 1 and latency > 0, got {slots}, {latency}")
    return slots, latency


def _stretched(latency: float, slots: int, outstanding: int) -> float:
    """A call's time with ``outstanding`` calls in progress: slower for everyone beyond ``slots``."""
    return latency * (1 + max(0, outstanding - slots) / slots)


def burn(seconds: float) -> None:
    """Hold the GIL and a core for about ``seconds`` (a CPU-bound handler's work)."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i
