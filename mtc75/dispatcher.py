"""Bounded concurrency: a ThreadPoolExecutor behind a semaphore of ``max_thread_count`` permits.

The poll thread puts fetched messages into a backlog; a message starts only when a permit is free.
A worker that holds a permit keeps taking the next backlog message until the backlog is empty, and
only then gives its permit back, so a busy pool never waits for the poll thread to hand out work.
Taking a message needs no lock (``deque.popleft`` is atomic); giving a permit back and adding work
share one lock, so "backlog empty, release" and "append, acquire" cannot race.

Finished messages are reported on a completion queue that only the poll thread drains, because
every Kafka call (store, commit) belongs to the poll thread.

Later ordering modes replace the plain FIFO backlog with a scheduler that hands out only messages
whose key (or partition) has nothing running; the permit and worker logic stays as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mtc75.offsets import PartitionState

logger = logging.getLogger(__name__)

Handler = Callable[[Any], object]


class Work:
    """One fetched message on its way through the pool."""

    __slots__ = ("message", "state", "offset", "failed")

    def __init__(self, message: Any, state: PartitionState, offset: int) -> None:
        self.message = message
        self.state = state  # the partition assignment it was fetched under
        self.offset = offset
        self.failed = False


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


class Dispatcher:
    """Runs ``handler(message)`` on at most ``max_thread_count`` threads at once."""

    def __init__(self, handler: Handler, max_thread_count: int) -> None:
        self._handler = handler
        self._lock = threading.Lock()
        self._permits = Permits(max_thread_count)
        self._backlog: deque[Work] = deque()
        self._executor = ThreadPoolExecutor(max_workers=max_thread_count, thread_name_prefix="mtc75-worker")
        self._workers = max_thread_count  # the executor's max_workers; resize() replaces it to grow
        # Notified when a worker gives its permit back, and when the backlog falls to _drain_mark.
        self._changed = threading.Condition(self._lock)
        self._drain_mark = -1  # backlog length a waiter wants to hear about (-1: nobody waits)
        self.completions: deque[Work] = deque()  # appended by workers, drained by the poll thread

    # -- poll-thread side -------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        """Queue fetched messages and start as many workers as there are free permits and work."""
        with self._lock:
            self._backlog.extend(items)
            starts = self._permits.acquire(len(self._backlog))
        for _ in range(starts):
            self._executor.submit(self._work)

    def purge(self, states: Iterable[PartitionState] | None = None) -> list[Work]:
        """Drop backlog messages not yet started (of the given assignments, or all) and return them.

        Dropped messages were never handled and are never committed, so the next owner reads them again.
        """
        with self._lock:
            taken: list[Work] = []
            try:
                while True:  # pop one by one: a worker popping concurrently gets each item or we do
                    taken.append(self._backlog.popleft())
            except IndexError:
                pass
            if states is None:
                return taken
            wanted = set(map(id, states))
            dropped, kept = [], []
            for work in taken:
                (dropped if id(work.state) in wanted else kept).append(work)
            self._backlog.extendleft(reversed(kept))  # in place: workers hold a reference to this deque
            return dropped

    def wait_idle(self, timeout: float) -> bool:
        """Block until no handler runs, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._permits.in_use:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def wait_backlog_at_most(self, mark: int, timeout: float) -> bool:
        """Block until at most ``mark`` messages wait (or a worker went idle), or ``timeout`` passes.

        Lets the poll thread sleep on the pool instead of in ``poll()``, and wake the moment the
        threads catch up. ``mark=-1`` waits only for a worker to go idle.
        """
        with self._changed:
            if len(self._backlog) <= mark:
                return True
            self._drain_mark = mark
            self._changed.wait(timeout)
            self._drain_mark = -1
            return len(self._backlog) <= mark

    @property
    def active_thread_count(self) -> int:
        """ACTIVE_THREAD_COUNT: permits held by threads running (or about to run) a handler."""
        return self._permits.in_use

    @property
    def max_active_threads(self) -> int:
        return self._permits.max_in_use

    @property
    def max_thread_count(self) -> int:
        return self._permits.limit

    def resize(self, limit: int) -> None:
        """Change the bound on running handlers (poll thread only).

        Growing takes the new permits at once, on a larger executor (ThreadPoolExecutor cannot grow;
        the old one finishes its running workers and lets its threads go). Shrinking never interrupts
        a handler: a worker gives its permit back after its current message while more permits are
        held than the new limit, so no new message starts until the excess has drained.
        """
        if limit < 1:
            raise ValueError(f"max_thread_count must be >= 1, got {limit}")
        if limit > self._workers:
            old = self._executor
            self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="mtc75-worker")
            self._workers = limit
            old.shutdown(wait=False)
        with self._lock:
            self._permits.limit = limit
            starts = self._permits.acquire(len(self._backlog))
        for _ in range(starts):
            self._executor.submit(self._work)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def shutdown(self, wait: bool) -> None:
        self.purge()
        self._executor.shutdown(wait=wait, cancel_futures=True)

    # -- worker side ------------------------------------------------------------------------------

    def _work(self) -> None:
        """Hold one permit and run backlog messages until none is left.

        The hot path takes a message without the lock (deque.popleft is atomic); only giving the
        permit back needs the lock, to re-check the backlog against a concurrent put().
        """
        handler = self._handler
        lock = self._lock
        backlog = self._backlog
        permits = self._permits
        done = self.completions.append
        while True:
            try:
                if permits.in_use > permits.limit:
                    raise IndexError  # the bound shrank: give this permit back
                work = backlog.popleft()
            except IndexError:
                # Before giving the permit back, let the poll thread run once: with fast handlers
                # it is usually refilling the backlog right now, and a restart costs a submit().
                time.sleep(0)
                if backlog and permits.in_use <= permits.limit:
                    continue
                with lock:
                    if not backlog or permits.in_use > permits.limit:
                        permits.release()
                        self._changed.notify_all()
                        return
                continue
            if len(backlog) <= self._drain_mark:
                with lock:
                    self._changed.notify_all()
            try:
                handler(work.message)
            except Exception as err:  # a handler failure must not kill the worker or stall its partition
                work.failed = True
                msg = work.message
                logger.error(
                    "handler failed for %s[%d]@%d: %s: %s",
                    msg.topic(), msg.partition(), work.offset, type(err).__name__, err,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
            done(work)
