"""One fetched message on its way from the poll thread through a scheduler and a runner to its commit.

Thread contract: created by the poll thread; then owned by exactly one party at a time, which alone
may touch it: the scheduler (waiting), a worker (running), the retry delay queue (waiting out a
backoff), or the completion queue (done, read by the poll thread). The hand-over between them is the
synchronisation (each hand-over goes through the dispatcher's lock or one atomic deque operation),
so a ``Work`` has no lock of its own. ``work.state`` is shared: see mtc75/core/offsets.py for the one
field of it a worker may read.
"""

from __future__ import annotations

from typing import Any

from mtc75.core.offsets import PartitionState


class Work:
    """One fetched message: the Kafka message, its assignment, its offset and its attempts so far."""

    __slots__ = ("message", "state", "offset", "failed", "attempts", "error")

    def __init__(self, message: Any, state: PartitionState, offset: int) -> None:
        self.message = message
        self.state = state  # the partition assignment it was fetched under
        self.offset = offset
        self.failed = False  # True once the last attempt failed
        self.attempts = 0  # handler calls that raised
        self.error = ""  # "ExceptionType: text" of the last failure
