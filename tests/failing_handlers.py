"""``--handler`` targets that fail on purpose (tests/test_handler_tracebacks.py).

Offsets listed in MTC75_TEST_FAIL (comma-separated, any partition) raise ``ValueError`` from a nested
function, :func:`_charge`, so a traceback that is shown must reach into the handler's own code. The
others return at once.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

FAIL = {int(o) for o in os.environ.get("MTC75_TEST_FAIL", "3").split(",") if o}


def _charge(offset: int) -> None:
    if offset in FAIL:
        raise ValueError(f"card declined for offset {offset}")


def handle(message: Any) -> None:
    _charge(message.offset())


async def handle_async(message: Any) -> None:
    await asyncio.sleep(0)
    _charge(message.offset())
