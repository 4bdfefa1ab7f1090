"""A ``--handler`` for the scale-out tests: records who handled what, and when, outside the process.

Each handled message appends ``pid partition offset start end`` (``time.monotonic()``, one clock for
every process on the machine) to ``$MTC75_TEST_INTERVALS/<pid>.txt`` after the work and flushes, so a
line means "handled" and survives a kill -9 of the process. MTC75_TEST_SLEEP is the work, in seconds
(an I/O-bound handler: it holds its thread, not the CPU). Called from the consumer's worker threads.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_path = Path(os.environ.get("MTC75_TEST_INTERVALS", ".")) / f"{os.getpid()}.txt"
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


def handle(message: Any) -> None:
    start = time.monotonic()
    if _sleep:
        time.sleep(_sleep)
    end = time.monotonic()
    with _lock:
        _file.write(f"{os.getpid()} {message.partition()} {message.offset()} {start:.6f} {end:.6f}\n")
        _file.flush()  # in the kernel now: survives a kill -9 of this process
