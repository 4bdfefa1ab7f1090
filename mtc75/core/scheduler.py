"""Schedulers: which waiting message runs next (pure: no threads of its own, no Kafka, no clock).

Thread contract: every method is called with the dispatcher's lock held (mtc75/runtime/dispatcher.py),
except ``take`` on a scheduler whose class sets ``LOCK_FREE_TAKE`` and ``release`` on one that sets
``LOCK_FREE_RELEASE``: those are called by workers without the lock, concurrently with each other and
with any locked call. ``len`` and ``ready``/``blocked`` may also be read without the lock, as hints
(the dispatcher re-checks ``ready`` under the lock before a worker gives its permit back).

A lock-free ``take`` therefore promises: it is one atomic step (the FIFO: one ``deque.popleft``
under the GIL), and every locked method keeps the structure valid for it at every point: ``put``
and ``requeue`` only ever append (each append atomic); ``purge`` removes one item at a time, so each
waiting message goes either to a concurrent ``take`` (it then counts as started) or to the purge, never to
both and never lost. A purge that puts survivors back leaves the queue briefly shorter; a worker that
sees it empty meanwhile re-checks under the lock, which the purge holds, before giving its permit
back. An ordered scheduler (per key, per partition) sets both flags False and gets every call locked.

The dispatcher owns one scheduler. The poll thread ``put``s fetched messages; workers ``take`` the
next one that may start and ``release`` it exactly once when its handler is done for good (success,
or failure of its last attempt). A message waiting out a retry backoff is NOT released: it still
holds its place, so an ordered scheduler keeps its key or partition blocked; due retries come back
through ``requeue``, and a retry purged while it waits (revoke, shutdown) is released then -- in
the delay queue or, once requeued, in the scheduler (the dispatcher knows it by ``attempts > 0``).
A purged message that was never taken is not released.

The no-op hot path (bench/noop_path.py) is why the FIFO is lock-free: see BENCHMARKS.md.
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

    LOCK_FREE_TAKE: bool  # take() may be called without the dispatcher's lock (see the module notes)
    LOCK_FREE_RELEASE: bool  # release() may be called without it

    def put(self, items: Iterable[Work]) -> None:
        """Add fetched messages (in fetch order)."""

    def requeue(self, items: list[Work]) -> None:
        """Add retries whose backoff passed: they go before anything fetched since."""

    def take(self) -> Work:
        """The next message that may start now; raises IndexError when none may.

        IndexError rather than None so that a deque's own ``popleft`` can be the FIFO's ``take``.
        """

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

    LOCK_FREE_TAKE = True  # one atomic popleft
    LOCK_FREE_RELEASE = True  # nothing is ever blocked: release has nothing to guard

    def __init__(self) -> None:
        self._queue: deque[Work] = deque()
        # The deque's own popleft, bound: atomic, raises IndexError when empty, and no Python frame on
        # the hot path (a Python-level take cost the no-op path ~0.1 us of its ~2.5 us per message).
        self.take = self._queue.popleft  # type: ignore[method-assign]

    def put(self, items: Iterable[Work]) -> None:
        self._queue.extend(items)

    def requeue(self, items: list[Work]) -> None:
        self._queue.extendleft(reversed(items))

    def take(self) -> Work:  # replaced per instance by the deque's popleft (see __init__)
        return self._queue.popleft()  # atomic: workers call it without the lock

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
        self._queue.extendleft(reversed(kept))  # one atomic step; a racing take() re-checks under the lock
        return dropped

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def ready(self) -> int:
        return len(self._queue)

    @property
    def blocked(self) -> int:
        return 0
