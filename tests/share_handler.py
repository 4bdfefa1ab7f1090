"""A ``--handler`` for the share-group tests: records what it handled, with the delivery, the process and the time.

Environment: MTC75_TEST_RECORD (file: ``partition:offset:delivery_count:pid:end`` appended and flushed after the
work; ``end`` is ``time.monotonic()``, one clock for every process on the machine), MTC75_TEST_STARTED
(optional file: ``partition:offset:delivery_count:pid:start`` when a handler starts), MTC75_TEST_SLEEP (seconds
every record takes), MTC75_TEST_SLOW (``p:o,p:o``: records that take MTC75_TEST_SLOW_SECONDS instead),
MTC75_TEST_POISON_EVERY (N: a record whose JSON ``id`` is N-1 modulo N always raises). Worker threads call it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

_lock = threading.Lock()
_record = open(os.environ.get("MTC75_TEST_RECORD", "records.txt"), "a", buffering=1)  # noqa: SIM115
_started_path = os.environ.get("MTC75_TEST_STARTED")
_started = open(_started_path, "a", buffering=1) if _started_path else None  # noqa: SIM115
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_slow_s = float(os.environ.get("MTC75_TEST_SLOW_SECONDS", "0"))
_slow = {
    (int(p), int(o)) for p, o in (item.split(":") for item in os.environ.get("MTC75_TEST_SLOW", "").split(",") if item)
}
_poison_every = int(os.environ.get("MTC75_TEST_POISON_EVERY", "0"))
_pid = os.getpid()


def handle(message: Any) -> None:
    where = f"{message.partition()}:{message.offset()}:{message.delivery_count()}:{_pid}"
    if _started is not None:
        with _lock:
            _started.write(f"{where}:{time.monotonic():.3f}\n")
            _started.flush()
    time.sleep(_slow_s if (message.partition(), message.offset()) in _slow else _sleep)
    if _poison_every and json.loads(message.value() or b"{}").get("id", 0) % _poison_every == _poison_every - 1:
        raise ValueError(f"poison record {message.value()!r}")
    with _lock:
        _record.write(f"{where}:{time.monotonic():.3f}\n")
        _record.flush()  # in the kernel now: survives a kill -9 of this process
