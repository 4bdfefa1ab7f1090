"""Schedulers: which waiting message runs next (pure: no threads of its own, no Kafka, no clock).

Thread contract: every method is called with the dispatcher's lock held (mtc75/runtime/dispatcher.py),
except ``take`` on a scheduler whose class sets ``LOCK_FREE_TAKE`` and ``release`` on one that sets
``LOCK_FREE_RELEASE``: those are called by workers without the dispatcher's lock, concurrently with
each other and with any locked call. ``len`` and ``ready``/``blocked`` may also be read without the
lock, as hints (the dispatcher re-checks ``ready`` under the lock before a worker gives its permit back).

A ``take`` free of the dispatcher's lock therefore guards itself: the FIFOs take under a small lock of
their own, which every other method that changes the queue also takes, so each waiting message goes
either to a ``take`` (it then counts as started) or to a concurrent ``purge``, never to both and never
lost, and the message count behind ``len`` is exact. (A lock-free ``popleft`` was the hot path while
every message was its own ``Work``; with chunks a take serves a whole chunk, and a lock per chunk costs
nothing measurable, while counting a chunk's messages without one is not safe: a sum over a deque that
another thread pops fails with "deque mutated during iteration" whenever the garbage collector runs
Python code in the middle of it.) An ordered scheduler (per key, per partition) sets both flags False
and gets every call locked.

The dispatcher owns one scheduler. The poll thread ``put``s fetched messages; workers ``take`` the
next one that may start and ``release`` it exactly once when its handler is done for good (success,
or failure of its last attempt). A message waiting out a retry backoff is NOT released: it still
holds its place, so an ordered scheduler keeps its key or partition blocked; due retries come back
through ``requeue``, and a retry purged while it waits (revoke, shutdown) is released then -- in
the delay queue or, once requeued, in the scheduler (the dispatcher knows it by ``attempts > 0``).
A purged message that was never taken is not released.

Chunks (mtc75/core/work.py): a scheduler whose ``takes_chunks`` is True may be handed a ``Work`` of several
consecutive messages, which a worker takes whole. Such a scheduler never blocks anything (a chunk's
messages run one after another on one worker, and ``release`` is a no-op), and it counts messages,
not ``Work`` objects, in ``len`` and ``ready``. The ordered schedulers take single messages only.

``FifoScheduler`` is the plain FIFO (unordered, first fetched first run; the bench's ``fifo``);
``ORDERING`` picks among the fair FIFO and the ordered modes (mtc75/core/ordering.py), further
implementations of the same interface.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Protocol

from mtc75.core.work import Work

# A Work's message count (1, or a chunk's length), for sums over lists only its owner holds.
size_of = attrgetter("size")


class Scheduler(Protocol):
    """The interface the dispatcher relies on."""

    LOCK_FREE_TAKE: bool  # take() may be called without the dispatcher's lock (see the module notes)
    LOCK_FREE_RELEASE: bool  # release() may be called without it
    takes_chunks: bool  # put() may be given chunks (mtc75/core/work.py): never blocks, release() is a no-op

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
        """Messages waiting, ready or blocked (the messages of a chunk count one by one)."""

    @property
    def ready(self) -> int:
        """Messages that ``take`` could hand out now."""

    @property
    def blocked(self) -> int:
        """Messages waiting behind a running message of their key or partition."""

    def behind(self, work: Work) -> int:
        """Messages waiting behind ``work`` (taken, not released) in its key's or partition's lane."""


class CountedScheduler:
    """The counts of an ordered scheduler (every call under the dispatcher's lock): a subclass keeps
    ``_waiting`` (messages waiting, ready or blocked) and ``_ready`` (those ``take`` could hand out now)."""

    LOCK_FREE_TAKE = False
    LOCK_FREE_RELEASE = False

    def __init__(self) -> None:
        self._waiting = 0
        self._ready = 0

    def __len__(self) -> int:
        return self._waiting

    @property
    def ready(self) -> int:
        """Messages that ``take`` could hand out now."""
        return self._ready

    @property
    def blocked(self) -> int:
        """Messages waiting behind a running message of their key or partition (or for their batch to fill)."""
        return self._waiting - self._ready


class FifoScheduler:
    """Unordered: every waiting message may start; first put, first taken."""

    LOCK_FREE_TAKE = True  # under its own lock (see the module notes)
    LOCK_FREE_RELEASE = True  # nothing is ever blocked: release has nothing to guard
    takes_chunks = True

    def __init__(self) -> None:
        self._queue: deque[Work] = deque()
        self._lock = threading.Lock()  # guards _queue and _count against concurrent takes
        self._count = 0  # messages in _queue (a chunk counts its messages)

    def put(self, items: Iterable[Work]) -> None:
        items = list(items)
        with self._lock:
            self._queue.extend(items)
            self._count += sum(map(size_of, items))

    def requeue(self, items: list[Work]) -> None:
        with self._lock:
            self._queue.extendleft(reversed(items))
            self._count += sum(map(size_of, items))

    def take(self) -> Work:
        with self._lock:
            work = self._queue.popleft()  # IndexError when empty
            self._count -= work.size
            return work

    def release(self, work: Work) -> None:
        pass  # nothing is ever blocked

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        with self._lock:
            if drop is None:
                dropped = list(self._queue)
                self._queue.clear()
            else:
                dropped, kept = [], []
                for work in self._queue:
                    (dropped if drop(work) else kept).append(work)
                self._queue = deque(kept)
            self._count -= sum(map(size_of, dropped))
        return dropped

    def __len__(self) -> int:
        return self._count

    @property
    def ready(self) -> int:
        return self._count

    @property
    def blocked(self) -> int:
        return 0

    def behind(self, work: Work) -> int:
        return 0  # nothing waits behind another
