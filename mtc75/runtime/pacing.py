"""Pacing: how many workers the dispatcher starts for a backlog, and how many messages a chunk holds.

A started worker is a thread woken to compete for the GIL, so a fast handler's backlog gets only the workers
that drain it within ``DRAIN_TARGET`` at the measured handler time per message (every worker for a handler of
``FAST_HANDLER`` or slower, and until a first measure); a backlog that stopped moving for ``STALL_SECONDS``
gets every free worker. Where scheduler and runner take chunks (mtc75/core/work.py), a fast handler's fetched
runs are cut into chunks of ``CHUNK_TARGET`` worth of handler time: each worker started gets about one.

Thread contract: workers report each Work's time (:meth:`Pacing.work_ended`, no lock: a lost update is one
sample) and set ``woken``; the dispatcher asks the rest (under its lock, or on the poll thread for
:meth:`Pacing.stalled`). Every field read without a lock is a hint.
"""

from __future__ import annotations

import math

# Extra started threads only fight for the GIL (BENCHMARKS.md, "Runs across the thread boundary").
DRAIN_TARGET = 0.001  # seconds within which the started workers should drain the backlog
FAST_HANDLER = 0.0001  # seconds per message below which put() starts only the workers needed
MIN_ACTIVE = 2  # workers a fast backlog gets at least
STALL_SECONDS = 0.005  # no message taken for this long while work waits: start every free worker
CHUNK_TARGET = DRAIN_TARGET  # a chunk's handler time: longer ones were no faster (BENCHMARKS.md)
SMOOTHING = 0.3  # weight of the newest Work in the measured time per message


class Pacing:
    """The measured handler time per message, and what the dispatcher makes of it."""

    def __init__(self) -> None:
        self.chunks = False  # scheduler and runner take chunks (set once the runner exists)
        # Handler seconds per message (smoothed); None until measured and after a chunk was cut short.
        self.per_message: float | None = None
        self.woken = False  # a worker handed messages back: the poll thread starts free workers for them
        self._takes_seen = 0  # poll thread: the dispatcher's take count at its last look
        self._takes_at = 0.0  # poll thread: when that count last changed

    def work_ended(self, seconds: float, messages: int) -> None:
        """The invoker's report of a Work (any worker thread, as its ``WorkObserver``)."""
        if messages:
            sample = seconds / messages
            old = self.per_message
            self.per_message = sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample

    def forget(self) -> None:
        """A chunk was cut short (the handler turned slow): single messages and every free worker until
        measured again."""
        self.per_message = None
        self.woken = True

    def chunk_size(self, cap: int) -> int:
        """Messages per Work to cut now (at most ``cap``): 1 unless chunks are on and the handler is fast."""
        per = self.per_message
        if not self.chunks or per is None or per >= FAST_HANDLER:
            return 1
        return max(1, min(int(CHUNK_TARGET / max(per, 1e-7)), cap))

    def wanted(self, waiting: int, active: int) -> int:
        """Workers to start for ``waiting`` messages while ``active`` run."""
        per = self.per_message
        if per is None or per >= FAST_HANDLER:
            return waiting
        target = max(MIN_ACTIVE, math.ceil(waiting * per / DRAIN_TARGET))
        return max(0, min(active + waiting, target) - active)

    def stalled(self, takes: int, now: float) -> bool:
        """Poll thread, while Works wait and permits are free: True when a worker handed messages back, or
        when ``takes`` (messages taken so far) has not moved for STALL_SECONDS."""
        if self.woken:
            self.woken = False
        elif takes != self._takes_seen:
            self._takes_seen, self._takes_at = takes, now
            return False
        elif now - self._takes_at < STALL_SECONDS:
            return False
        self._takes_at = now
        return True
