"""The CPU-bound handlers of bench/processes.py: pure-Python work that holds the GIL for a fixed CPU time.

Each call spins for its milliseconds of *its own thread's* CPU time (``time.thread_time``), in small loops of
integer arithmetic, so a handler thread that waits for the GIL does not count that wait as work: at 2
threads each call still costs 2 ms of CPU, and the pair serves no faster than one. Module-level functions,
so RUNNER="processes" sends them to worker processes by name.
"""

from __future__ import annotations

import time
from typing import Any


def spin(ms: float) -> int:
    end = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < end:
        for i in range(100):
            n += i * i % 7
    return n


def spin_1ms(_message: Any) -> None:
    spin(1.0)


def spin_2ms(_message: Any) -> None:
    spin(2.0)
