"""One fetched message, or several of one partition, on its way from the poll thread through a scheduler
and a runner to its commit.

A Work of ``size`` > 1 is one of two things. A *chunk*: consecutive offsets of one assignment on the
unordered fast path of a per-message handler (one object, one take and one completion instead of one per
message, which is what the poll thread of a no-op consumer spends its time on); a chunk that did not
simply succeed is split (:meth:`Work.part`) before any of it is settled, so ``attempts``, ``failed``,
``dropped``, ``error`` and ``exception`` only ever mean something on a single message. Or a *batch*: the
list a batch handler is called with (mtc75/core/batching.py), messages of one assignment in offset order, not always
consecutive (``ORDERING=key`` leaves out the keys running elsewhere); a batch is retried whole, and once it
is split (its last attempt failed, or the handler named the failed messages) its *pieces* point back to it
through ``batch`` and settle one by one, the batch's ``left`` counting those still to settle.

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

    __slots__ = ("message", "messages", "state", "offset", "size", "_offsets", "failed", "dropped", "attempts",
                 "error", "exception", "paid", "put_at", "batch", "left", "outputs")

    def __init__(self, message: Any, state: PartitionState, offset: int) -> None:
        self.message = message  # the first (for a single message: the only) message
        self.messages: Sequence[Any] = (message,)  # every message, in offset order
        self.state = state  # the partition assignment it was fetched under
        self.offset = offset  # the first message's offset
        self.size = 1  # messages
        self._offsets: Sequence[int] | None = None  # None: consecutive from ``offset`` (see ``offsets``)
        self.failed = False  # True once it did not complete: its last attempt failed, or it was dropped
        self.dropped = False  # True (with failed) when it never ran: its assignment was given up
        self.attempts = 0  # handler calls that raised
        self.error = ""  # "ExceptionType: text" of the last failure
        self.exception: BaseException | None = None  # the last failure itself, kept only for on_error
        self.paid = 0  # rate tokens this start already took (mtc75/core/ratelimit.py PAID_*); 0 once it starts
        self.put_at = 0.0  # when the dispatcher queued it (a batch waits at most BATCH_WAIT from there)
        self.batch: Work | None = None  # a piece of a split batch: that batch
        self.left = 0  # a split batch: its pieces not settled yet
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

    @classmethod
    def of(cls, messages: Sequence[Any], offsets: Sequence[int], state: PartitionState) -> Work:
        """One Work of ``messages`` with ``offsets`` (one assignment's, ascending, gaps allowed)."""
        work = cls(messages[0], state, offsets[0])
        work.messages = messages
        work.size = len(messages)
        if offsets[-1] - offsets[0] != len(offsets) - 1:
            work._offsets = offsets
        return work

    @classmethod
    def merged(cls, works: Sequence[Work]) -> Work:
        """One batch of ``works`` (one assignment's, in offset order): their messages and offsets, in that order."""
        if len(works) == 1:
            return works[0]
        work = cls.of([m for w in works for m in w.messages], [o for w in works for o in w.offsets], works[0].state)
        work.put_at = min(w.put_at for w in works)
        return work

    @property
    def offsets(self) -> Sequence[int]:
        """Every message's offset, in order: a range when they are consecutive."""
        offsets = self._offsets
        return range(self.offset, self.offset + self.size) if offsets is None else offsets

    @property
    def consecutive(self) -> bool:
        return self._offsets is None

    def split(self, size: int = 1) -> list[Work]:
        """This chunk cut into chunks of at most ``size`` messages, in order (single messages for 1)."""
        if self.size <= size:
            return [self]
        return [self.part(i, min(i + size, self.size)) for i in range(0, self.size, size)]

    def part(self, start: int, stop: int) -> Work:
        """The messages ``start .. stop - 1`` of this Work (a single message when that is one)."""
        if stop - start == 1:
            part = Work(self.messages[start], self.state, self.offsets[start])
        elif self.consecutive:
            part = Work.chunk(self.messages[start:stop], self.state, self.offset + start)
        else:
            part = Work(self.messages[start], self.state, self.offsets[start])
            part.messages, part._offsets, part.size = self.messages[start:stop], self.offsets[start:stop], stop - start
        part.put_at = self.put_at
        if self.outputs is not None:
            offsets = set(part.offsets)
            part.outputs = [pair for pair in self.outputs if pair[0] in offsets] or None
        return part
