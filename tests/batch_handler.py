"""A batch ``--handler`` (``BATCH_SIZE`` > 1) for subprocess tests: records what it handled outside the process.

Environment: MTC75_TEST_RECORD (file to append ``partition:offset:tag`` to, one line per message of a batch
that returned, written and flushed after the work), MTC75_TEST_TAG (which run wrote it), MTC75_TEST_SLEEP
(seconds each call takes), MTC75_TEST_POISON (``p:o``: a batch holding that message raises ValueError).
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
_poison = tuple(int(x) for x in os.environ["MTC75_TEST_POISON"].split(":")) if os.environ.get(
    "MTC75_TEST_POISON") else None
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


def handle(batch: list[Any]) -> None:
    time.sleep(_sleep)
    where = [(m.partition(), m.offset()) for m in batch]
    if _poison in where:
        raise ValueError(f"poison message {_poison[0]}:{_poison[1]} in a batch of {len(batch)}")
    lines = "".join(f"{p}:{o}:{_tag}\n" for p, o in where)
    with _lock:
        _file.write(lines)
        _file.flush()  # in the kernel now: survives a kill -9 of this process
