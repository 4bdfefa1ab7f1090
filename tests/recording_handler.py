"""A ``--handler`` for subprocess tests: records ``partition:offset`` outside the consumer process.

Configured by environment: MTC75_TEST_RECORD (file to append to), MTC75_TEST_SLEEP (seconds of work).
Each line is written and flushed *after* the work, so a line means "handled".
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

_lock = threading.Lock()
_path = os.environ.get("MTC75_TEST_RECORD", "records.txt")
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


def handle(message: Any) -> None:
    if _sleep:
        time.sleep(_sleep)
    with _lock:
        _file.write(f"{message.partition()}:{message.offset()}\n")
        _file.flush()  # in the kernel now: survives a kill -9 of this process
