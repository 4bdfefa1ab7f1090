"""Handlers of tests/test_matrix.py that run in worker processes (RUNNER="processes"): what they saw goes to
the file MTC75_TEST_MATRIX_RECORD, one JSON line per call, written after the call's work; with
MTC75_TEST_MATRIX_OUTPUT set, each returns one mtc75.Output per message to that topic."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import mtc75

POISON = (1, 17)
_lock = threading.Lock()


def _record(messages: list[Any], started: float) -> list[mtc75.Output] | None:
    seen = [(m.partition(), m.offset(), (m.key() or b"").decode(), _plain(m.value())) for m in messages]
    line = json.dumps({"seen": seen, "started": started, "ended": time.monotonic()})
    with _lock, open(os.environ["MTC75_TEST_MATRIX_RECORD"], "a") as out:
        out.write(line + "\n")
    if any((p, o) == POISON for p, o, _k, _v in seen):
        raise ValueError("poison message")
    out = os.environ.get("MTC75_TEST_MATRIX_OUTPUT")
    return [mtc75.Output(out, f"{p}:{o}") for p, o, _k, _v in seen] if out else None


def _plain(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def one(message: Any) -> list[mtc75.Output] | None:
    started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    time.sleep(0.001)
    return _record([message], started)


def batch(messages: list[Any]) -> list[mtc75.Output] | None:
    started = time.monotonic()
    time.sleep(0.001)
    return _record(messages, started)
