"""A ``--handler`` that transforms: returns one ``mtc75.Output`` per input, naming the input it came from.

Configured by environment: MTC75_TEST_OUT (the output topic), MTC75_TEST_SLEEP (seconds of work per
message), MTC75_TEST_RECORD (optional: a ``partition:offset`` line appended after the work, before the
return -- progress for the kill loops; a line means "handled", not "written").
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from mtc75 import Output

_out = os.environ.get("MTC75_TEST_OUT", "out")
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_path = os.environ.get("MTC75_TEST_RECORD")
_file = open(_path, "a", buffering=1) if _path else None  # noqa: SIM115 - lives as long as the process
_lock = threading.Lock()


def handle(message: Any) -> Output:
    if _sleep:
        time.sleep(_sleep)
    if _file is not None:
        with _lock:
            _file.write(f"{message.partition()}:{message.offset()}\n")
            _file.flush()
    return Output(_out, json.dumps({"p": message.partition(), "o": message.offset()}).encode(), key=message.key())
