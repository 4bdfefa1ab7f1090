"""A ``--handler`` for the offset-map tests: chosen offsets are slow, the rest quick; records what it handled.

Environment: MTC75_TEST_RECORD (file to append ``partition:offset:tag`` to, after the work, flushed),
MTC75_TEST_TAG (which run wrote the line), MTC75_TEST_SLOW (``p:o,p:o`` offsets that take
MTC75_TEST_SLOW_SECONDS), MTC75_TEST_SLEEP (seconds every other message takes).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

_lock = threading.Lock()
_path = os.environ.get("MTC75_TEST_RECORD", "records.txt")
_tag = os.environ.get("MTC75_TEST_TAG", "-")
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_slow_s = float(os.environ.get("MTC75_TEST_SLOW_SECONDS", "0"))
_slow = {
    (int(p), int(o)) for p, o in (item.split(":") for item in os.environ.get("MTC75_TEST_SLOW", "").split(",") if item)
}
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


def handle(message: Any) -> None:
    key = (message.partition(), message.offset())
    time.sleep(_slow_s if key in _slow else _sleep)
    with _lock:
        _file.write(f"{key[0]}:{key[1]}:{_tag}\n")
        _file.flush()  # in the kernel now: survives a kill -9 of this process
