"""A ``--handler`` for subprocess tests: records ``partition:offset`` outside the consumer process.

Configured by environment: MTC75_TEST_RECORD (file to append to), MTC75_TEST_SLEEP (seconds of work),
MTC75_TEST_POISON_EVERY (N: a message whose JSON ``id`` is N-1 modulo N always raises, so 1/N of
the messages are poison), MTC75_TEST_STARTED (optional second file: a line when a handler *starts*).
Each MTC75_TEST_RECORD line is written and flushed *after* the work, so a line means "handled".
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

_lock = threading.Lock()
_path = os.environ.get("MTC75_TEST_RECORD", "records.txt")
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_poison_every = int(os.environ.get("MTC75_TEST_POISON_EVERY", "0"))
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
_started_path = os.environ.get("MTC75_TEST_STARTED")
_started = open(_started_path, "a", buffering=1) if _started_path else None  # noqa: SIM115


def is_poison(value: bytes | None, every: int) -> bool:
    return bool(every) and json.loads(value or b"{}").get("id", 0) % every == every - 1


def handle(message: Any) -> None:
    if _started is not None:
        with _lock:
            _started.write(f"{message.partition()}:{message.offset()}\n")
            _started.flush()
    if _sleep:
        time.sleep(_sleep)
    if is_poison(message.value(), _poison_every):
        raise ValueError(f"poison message {message.value()!r}")
    with _lock:
        _file.write(f"{message.partition()}:{message.offset()}\n")
        _file.flush()  # in the kernel now: survives a kill -9 of this process
