"""A ``--handler`` for the offset-map tests: chosen offsets are slow, the rest quick; records what it handled.

Environment: MTC75_TEST_RECORD (file to append ``partition:offset:tag`` to, after the work, flushed),
MTC75_TEST_TAG (which run wrote the line), MTC75_TEST_SLOW (``p:o,p:o`` offsets that take
MTC75_TEST_SLOW_SECONDS), MTC75_TEST_SLOW_EVERY (N: also every offset divisible by N, except 0),
MTC75_TEST_SLEEP (seconds every other message takes; with MTC75_TEST_SLEEP_MAX, a time drawn
between the two, the same for an offset in every run), MTC75_TEST_SLOW_UNTIL (a file: slow offsets also
wait until it exists, at most RELEASE_WAIT seconds, so a test can hold them until it saw what it needs).
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

_lock = threading.Lock()
_path = os.environ.get("MTC75_TEST_RECORD", "records.txt")
_tag = os.environ.get("MTC75_TEST_TAG", "-")
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_sleep_max = float(os.environ.get("MTC75_TEST_SLEEP_MAX", "0"))
_slow_every = int(os.environ.get("MTC75_TEST_SLOW_EVERY", "0"))
_slow_s = float(os.environ.get("MTC75_TEST_SLOW_SECONDS", "0"))
_slow = {
    (int(p), int(o)) for p, o in (item.split(":") for item in os.environ.get("MTC75_TEST_SLOW", "").split(",") if item)
}
_release = os.environ.get("MTC75_TEST_SLOW_UNTIL", "")
RELEASE_WAIT = 120.0  # seconds a slow offset waits at most for MTC75_TEST_SLOW_UNTIL
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


def handle(message: Any) -> None:
    key = (message.partition(), message.offset())
    if key in _slow or (_slow_every and key[1] and key[1] % _slow_every == 0):
        time.sleep(_slow_s)
        deadline = time.monotonic() + RELEASE_WAIT
        while _release and not os.path.exists(_release) and time.monotonic() < deadline:
            time.sleep(0.05)
    elif _sleep_max > _sleep:
        time.sleep(random.Random(key[0] * 1_000_003 + key[1]).uniform(_sleep, _sleep_max))
    else:
        time.sleep(_sleep)
    with _lock:
        _file.write(f"{key[0]}:{key[1]}:{_tag}\n")
        _file.flush()  # in the kernel now: survives a kill -9 of this process
