"""``async def`` targets for ``--handler`` in tests/test_async_e2e.py (run in the consumer's process).

Appends ``partition:offset:event`` to MTC75_TEST_RECORD (line-buffered, flushed) for every message:
``start`` when the handler begins, ``done`` when it finished its work, ``cancelled`` when it was
cancelled. Runs on the consumer's event-loop thread, so the file needs no lock. MTC75_TEST_SLEEP is
each message's ``await asyncio.sleep`` (seconds); offsets listed in MTC75_TEST_HANG (comma-separated)
wait for ever instead (until cancelled).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

_file = open(os.environ.get("MTC75_TEST_RECORD", "records.txt"), "a", buffering=1)  # noqa: SIM115
_sleep = float(os.environ.get("MTC75_TEST_SLEEP", "0.05"))
_hang = {int(o) for o in os.environ.get("MTC75_TEST_HANG", "").split(",") if o}


def _note(message: Any, event: str) -> None:
    _file.write(f"{message.partition()}:{message.offset()}:{event}\n")
    _file.flush()


async def handle(message: Any) -> None:
    """A well-behaved handler: waits without blocking the loop."""
    _note(message, "start")
    try:
        if message.offset() in _hang:
            await asyncio.Event().wait()
        await asyncio.sleep(_sleep)
    except asyncio.CancelledError:
        _note(message, "cancelled")
        raise
    _note(message, "done")


async def handle_blocking(message: Any) -> None:
    """The mistake the loop-lag monitor is for: a blocking sleep inside ``async def``."""
    _note(message, "start")
    time.sleep(_sleep)
    _note(message, "done")
