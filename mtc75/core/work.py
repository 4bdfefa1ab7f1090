"""One fetched message, or a chunk of them, on its way from the poll thread through a scheduler and a
runner to its commit.

A *chunk* is a ``Work`` of ``size`` > 1: consecutive offsets ``offset .. offset + size - 1`` of one
assignment, in ``messages``. Chunks exist only on the unordered fast path (fast handlers, a scheduler and
a runner that take them): one object, one take and one completion instead of one per message, which is
what the poll thread of a no-op consumer spends its time on. Everything that deals with one message -- a
failure, a retry, the dead-letter queue, the ordered schedulers -- gets single messages: a chunk that did
not simply succeed is split (:meth:`Work.part`) before any of it is settled, so ``attempts``, ``failed``,
``dropped`` and ``error`` only ever mean something on a single message.

Thread contract: created by the poll thread (or, split off a chunk, by the worker that holds it); then
owned by exactly one party at a time, which alone may touch it: the scheduler (waiting), a worker
(running), the retry delay queue (waiting out a backoff), or the completion queue (done, read by the poll
thread). Each hand-over goes through the dispatcher's lock or one atomic deque operation, so a ``Work``
has no lock of its own. ``work.state`` is shared: see mtc75/core/offsets.py for what a worker may read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtc75.core.offsets import PartitionState


class Work:
    """One fetched message (or a chunk): the Kafka message(s), the assignment, the first offset, the attempts."""

    __slots__ = ("message", "messages", "state", "offset", "size", "failed", "dropped", "attempts", "error",
                 "outputs")

    def __init__(self, message: Any, state: PartitionState, offset: int) -> None:
        self.message = message  # the first (for a single message: the only) message
        self.messages: Sequence[Any] = (message,)  # every message, in offset order
        self.state = state  # the partition assignment it was fetched under
        self.offset = offset  # the first message's offset
        self.size = 1  # messages: offsets offset .. offset + size - 1
        self.failed = False  # True once it did not complete: its last attempt failed, or it was dropped
        self.dropped = False  # True (with failed) when it never ran: its assignment was given up
        self.attempts = 0  # handler calls that raised
        self.error = ""  # "ExceptionType: text" of the last failure
        # What the handler returned to be written, as (offset, Output) pairs (mtc75/core/output.py); None:
        # nothing. Set by the worker that ran it; the message is done once they are written.
        self.outputs: list[tuple[int, Any]] | None = None

    @classmethod
    def chunk(cls, messages: Sequence[Any], state: PartitionState, first: int) -> Work:
        """A chunk of ``messages`` with the consecutive offsets ``first, first + 1, ...`` of ``state``."""
        work = cls(messages[0], state, first)
        work.messages = messages
        work.size = len(messages)
        return work

    @property
    def offsets(self) -> range:
        return range(self.offset, self.offset + self.size)

    def split(self, size: int = 1) -> list[Work]:
        """This chunk cut into chunks of at most ``size`` messages, in order (single messages for 1)."""
        if self.size <= size:
            return [self]
        return [self.part(i, min(i + size, self.size)) for i in range(0, self.size, size)]

    def part(self, start: int, stop: int) -> Work:
        """The messages ``start .. stop - 1`` of this chunk (a single message when that is one)."""
        if stop - start == 1:
            part = Work(self.messages[start], self.state, self.offset + start)
        else:
            part = Work.chunk(self.messages[start:stop], self.state, self.offset + start)
        if self.outputs is not None:
            low, high = self.offset + start, self.offset + stop
            part.outputs = [pair for pair in self.outputs if low <= pair[0] < high] or None
        return part
