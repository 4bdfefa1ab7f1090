"""Handlers of tests/test_matrix.py that run in worker processes (RUNNER="processes"): what they saw goes to
the file MTC75_TEST_MATRIX_RECORD, one JSON line per call, written after the call's work."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

POISON = (1, 17)
_lock = threading.Lock()


def _record(messages: list[Any], started: float) -> None:
    seen = [(m.partition(), m.offset(), (m.key() or b"").decode(), _plain(m.value())) for m in messages]
    line = json.dumps({"seen": seen, "started": started, "ended": time.monotonic()})
    with _lock, open(os.environ["MTC75_TEST_MATRIX_RECORD"], "a") as out:
        out.write(line + "\n")
    if any((p, o) == POISON for p, o, _k, _v in seen):
        raise ValueError("poison message")


def _plain(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def one(message: Any) -> None:
    started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    time.sleep(0.001)
    _record([message], started)


def batch(messages: list[Any]) -> None:
    started = time.monotonic()
    time.sleep(0.001)
    _record(messages, started)
