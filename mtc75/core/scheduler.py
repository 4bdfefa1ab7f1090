"""Schedulers: which waiting message runs next (pure: no threads of its own, no Kafka, no clock).

The dispatcher (mtc75/runtime/dispatcher.py) owns one scheduler. The poll thread ``put``s fetched
messages; workers ``take`` the next one that may start and ``release`` it when its handler is done
for good (success or last failure: a message waiting for a retry still holds its place, so an
ordered scheduler keeps its key or partition blocked); due retries come back through ``requeue``.

Thread contract: every method is called with the dispatcher's lock held, except ``take`` (and the
``len``/``ready`` reads used as hints) on a scheduler whose class sets ``LOCK_FREE_TAKE``: the FIFO
takes with one atomic ``deque.popleft`` so the no-op hot path needs no lock (see BENCHMARKS.md).

``FifoScheduler`` is today's behaviour (unordered, first fetched first run); ordering modes and fair
round-robin across partitions are further implementations of the same interface.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from mtc75.core.work import Work


class Scheduler(Protocol):
    """The interface the dispatcher relies on."""

    LOCK_FREE_TAKE: bool

    def put(self, items: Iterable[Work]) -> None:
        """Add fetched messages (in fetch order)."""

    def requeue(self, items: list[Work]) -> None:
        """Add retries whose backoff passed: they go before anything fetched since."""

    def take(self) -> Work | None:
        """The next message that may start now, or None."""

    def release(self, work: Work) -> None:
        """``work`` is done for good: whatever it blocked (its key, its partition) may run."""

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        """Remove and return the waiting messages ``drop`` selects (all without one)."""

    def __len__(self) -> int:
        """Messages waiting, ready or blocked."""

    @property
    def ready(self) -> int:
        """Messages that ``take`` could hand out now."""

    @property
    def blocked(self) -> int:
        """Messages waiting behind a running message of their key or partition."""


class FifoScheduler:
    """Unordered: every waiting message may start; first put, first taken."""

    LOCK_FREE_TAKE = True

    def __init__(self) -> None:
        self._queue: deque[Work] = deque()

    def put(self, items: Iterable[Work]) -> None:
        self._queue.extend(items)

    def requeue(self, items: list[Work]) -> None:
        self._queue.extendleft(reversed(items))

    def take(self) -> Work | None:
        try:
            return self._queue.popleft()  # atomic: workers call it without the lock
        except IndexError:
            return None

    def release(self, work: Work) -> None:
        pass  # nothing is ever blocked

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        taken: list[Work] = []
        try:
            while True:  # one by one: a worker popping concurrently gets each item, or we do
                taken.append(self._queue.popleft())
        except IndexError:
            pass
        if drop is None:
            return taken
        dropped, kept = [], []
        for work in taken:
            (dropped if drop(work) else kept).append(work)
        self._queue.extendleft(reversed(kept))
        return dropped

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def ready(self) -> int:
        return len(self._queue)

    @property
    def blocked(self) -> int:
        return 0
