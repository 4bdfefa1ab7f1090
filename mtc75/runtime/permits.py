"""Permits: the bound on running handlers. Callers hold the dispatcher's lock for every method.

Thread contract: any thread (the poll thread acquiring for new workers, a worker giving its permit
back, the poll thread resizing), but only with :class:`mtc75.runtime.dispatcher.Dispatcher`'s lock
held; ``in_use`` and ``limit`` may be read without it as hints (a decision re-checks under the lock).
"""

from __future__ import annotations


class Permits:
    """A counting semaphore whose size can change; the caller holds the dispatcher lock.

    ``threading.Semaphore`` cannot shrink, and its own lock would be a second round-trip per message.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_thread_count must be >= 1, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.max_in_use = 0

    @property
    def free(self) -> int:
        return max(0, self.limit - self.in_use)

    def acquire(self, count: int) -> int:
        """Take up to ``count`` permits without blocking; returns how many were taken."""
        taken = min(count, self.free)
        if taken:
            self.in_use += taken
            if self.in_use > self.max_in_use:
                self.max_in_use = self.in_use
        return taken

    def release(self) -> None:
        if self.in_use <= 0:
            raise RuntimeError("permit released more often than acquired")
        self.in_use -= 1
