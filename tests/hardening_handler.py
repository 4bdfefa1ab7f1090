"""``--handler`` targets for test_faults_hardening.py: each message's JSON ``act`` field says what to do.

Records ``partition:offset:id:tag`` (MTC75_TEST_RECORD, flushed after the work; tag from MTC75_TEST_TAG)
for every message it handled. Acts: ``ok`` (default), ``fail`` (ValueError), ``systemexit``,
``keyboardinterrupt``, ``cancelled`` (asyncio.CancelledError), ``badstr`` (an exception whose str()
raises), ``hang`` (never returns). MTC75_TEST_SLEEP adds seconds of work to every ``ok`` message.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

_lock = threading.Lock()
_path = os.environ.get("MTC75_TEST_RECORD", "records.txt")
_tag = os.environ.get("MTC75_TEST_TAG", "-")
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0"))
_file = open(_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


def _act(message: Any) -> tuple[str, int]:
    record = json.loads(message.value() or b"{}")
    return record.get("act", "ok"), int(record.get("id", -1))


def handle(message: Any) -> None:
    act, ident = _act(message)
    if act == "fail":
        raise ValueError(f"failing message {ident}")
    if act == "systemexit":
        raise SystemExit(3)
    if act == "keyboardinterrupt":
        raise KeyboardInterrupt
    if act == "cancelled":
        raise asyncio.CancelledError
    if act == "badstr":
        raise UnprintableError
    if act == "hang":
        threading.Event().wait()
    if _sleep:
        time.sleep(_sleep)
    with _lock:
        _file.write(f"{message.partition()}:{message.offset()}:{ident}:{_tag}\n")
        _file.flush()


async def handle_async(message: Any) -> None:
    handle(message)


def handle_returns_coroutine(message: Any) -> object:
    """A plain function that hands back a coroutine: the work would never run."""
    return handle_async(message)
