"""The I/O-bound handler of bench/scaleout.py and bench/share.py: waits MTC75_BENCH_WORK seconds (holds a
thread, not the CPU).

Appends ``start end`` (``time.monotonic()``, one clock for every process on the machine) per handled
message to ``$MTC75_BENCH_RECORD_DIR/<pid>.txt``. Called from the consumer's worker threads.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_work = float(os.environ.get("MTC75_BENCH_WORK", "0.01"))
_file = open(Path(os.environ.get("MTC75_BENCH_RECORD_DIR", ".")) / f"{os.getpid()}.txt", "a")  # noqa: SIM115


def handle(_message: Any) -> None:
    start = time.monotonic()
    time.sleep(_work)
    end = time.monotonic()
    with _lock:
        _file.write(f"{start:.6f} {end:.6f}\n")
        _file.flush()


def handle_offset(message: Any) -> None:
    """As :func:`handle`, with the record's ``partition:offset`` as a third column (bench/share.py counts
    duplicates with it)."""
    start = time.monotonic()
    time.sleep(_work)
    end = time.monotonic()
    with _lock:
        _file.write(f"{start:.6f} {end:.6f} {message.partition()}:{message.offset()}\n")
        _file.flush()
