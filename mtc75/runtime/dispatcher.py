"""Bounded concurrency: a ThreadPoolExecutor behind a semaphore of ``max_thread_count`` permits.

The poll thread puts fetched messages into a backlog; a message starts only when a permit is free.
A worker that holds a permit keeps taking the next backlog message until the backlog is empty, and
only then gives its permit back, so a busy pool never waits for the poll thread to hand out work.
Taking a message needs no lock (``deque.popleft`` is atomic); giving a permit back and adding work
share one lock, so "backlog empty, release" and "append, acquire" cannot race.

How many workers a batch starts follows the handler's measured time per message: a started worker
is a thread woken to compete for the GIL, and with fast handlers the running ones drain the backlog
before new ones even start. :meth:`Dispatcher.put` starts enough workers to drain the backlog within
``DRAIN_TARGET`` (all of them for handlers of ``FAST_HANDLER`` or slower, and until a first measure);
the poll thread's :meth:`Dispatcher.release_due` starts the rest as soon as the backlog stops moving
for ``STALL_SECONDS`` (a fast handler that got slow). Workers count messages taken in ``_takes``
without a lock; the poll thread only compares it with its last reading.

Finished messages are reported on a completion queue that only the poll thread drains, because
every Kafka call (store, commit) belongs to the poll thread.

A handler that raises gets its message retried per :class:`mtc75.core.retry.RetryPolicy`: the message
waits for its backoff in a delay queue, holding no thread, and re-enters the backlog when due (checked
by workers looking for work and by the poll thread's :meth:`Dispatcher.release_due`). Only after its
last attempt does it reach the completion queue, marked failed, for the poll thread to dead-letter,
skip or stop on.

Later ordering modes replace the plain FIFO backlog with a scheduler that hands out only messages
whose key (or partition) has nothing running; the permit and worker logic stays as it is.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mtc75.core.offsets import PartitionState
from mtc75.core.retry import DelayQueue, RetryPolicy
from mtc75.core.work import Work
from mtc75.runtime.handlers import awaitable_result_error

logger = logging.getLogger(__name__)

Handler = Callable[[Any], object]

# Measured with a no-op handler (bench/child.py, lz4 100 B, 500 000 messages): 75 started threads cost
# 9.9 us of CPU per message, 4 threads 5.2 us, for the same work; the extra threads only fought for the GIL.
DRAIN_TARGET = 0.001  # seconds within which the started workers should drain the backlog
FAST_HANDLER = 0.0001  # seconds per message below which put() starts only the workers needed
MIN_ACTIVE = 2  # workers a fast backlog gets at least
STALL_SECONDS = 0.005  # no message taken for this long while work waits: start every free worker


class NotRunError(TypeError):
    """The handler returned without doing the work (it returned an awaitable nobody awaits)."""


def describe_error(err: BaseException) -> str:
    """``"Type: text"`` of a handler's exception, built so that it never raises itself.

    A handler's exception class is user code: its ``__str__`` may raise, or return something that is
    not a string. The failure must still be reported and retried, not kill the worker.
    """
    name = type(err).__name__
    try:
        text = str(err)
    except BaseException as inner:  # whatever __str__ raises, the failure is still reported
        text = f"<str() failed: {type(inner).__name__}>"
    return f"{name}: {text}" if text else name


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

    def __init__(self, handler: Handler, max_thread_count: int, retry: RetryPolicy | None = None) -> None:
        self._handler = handler
        self._retry = retry if retry is not None else RetryPolicy(max_attempts=1, base=0.0, cap=0.0)
        self._lock = threading.Lock()
        self._permits = Permits(max_thread_count)
        self._backlog: deque[Work] = deque()
        self._delayed: DelayQueue[Work] = DelayQueue()  # failed messages waiting for their next attempt
        self.retried = 0  # retries scheduled (a message failing 3 times with 3 attempts counts 2)
        self._executor = ThreadPoolExecutor(max_workers=max_thread_count, thread_name_prefix="mtc75-worker")
        self._workers = max_thread_count  # the executor's max_workers; resize() replaces it to grow
        # Notified when a worker gives its permit back, and when the backlog falls to _drain_mark.
        self._changed = threading.Condition(self._lock)
        self._drain_mark = -1  # backlog length a waiter wants to hear about (-1: nobody waits)
        self.completions: deque[Work] = deque()  # appended by workers, drained by the poll thread
        self._per_message: float | None = None  # seconds a worker spends per message (smoothed), under the lock
        self._takes = 0  # messages taken by workers (no lock: only compared for a change)
        self._takes_seen = 0  # poll thread: _takes at its last look
        self._takes_at = 0.0  # poll thread: when _takes last changed

    # -- poll-thread side -------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        """Queue fetched messages and start as many workers as there are free permits and work."""
        with self._lock:
            self._backlog.extend(items)
            if self._delayed:
                self._promote_due(time.monotonic())
            starts = self._permits.acquire(self._wanted(len(self._backlog)))
        for _ in range(starts):
            self._executor.submit(self._work)

    def _wanted(self, waiting: int) -> int:
        """Caller holds the lock. Workers to start for ``waiting`` messages (see the module notes)."""
        per = self._per_message
        if per is None or per >= FAST_HANDLER:
            return waiting
        active = self._permits.in_use
        target = max(MIN_ACTIVE, math.ceil(waiting * per / DRAIN_TARGET))
        return max(0, min(active + waiting, target) - active)

    def release_due(self) -> None:
        """Start workers for retries whose backoff has passed, and for a backlog that stopped moving.

        Called by the poll thread on every loop turn.
        """
        if not self._delayed:
            self._unstall()
            return  # the common case, checked without the lock
        with self._lock:
            self._promote_due(time.monotonic())
            # also covers retries a busy worker promoted: it took no permits for them
            starts = self._permits.acquire(len(self._backlog))
        for _ in range(starts):
            self._executor.submit(self._work)

    def _unstall(self) -> None:
        """Start every free worker when messages wait and none was taken for STALL_SECONDS."""
        if not self._backlog or self._permits.in_use >= self._permits.limit:
            return
        now = time.monotonic()
        if self._takes != self._takes_seen:
            self._takes_seen, self._takes_at = self._takes, now
            return
        if now - self._takes_at < STALL_SECONDS:
            return
        with self._lock:
            starts = self._permits.acquire(len(self._backlog))
        self._takes_at = now
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
                taken.extend(self._delayed.remove_if(lambda _w: True))
                return taken
            wanted = set(map(id, states))
            dropped, kept = [], []
            for work in taken:
                (dropped if id(work.state) in wanted else kept).append(work)
            self._backlog.extendleft(reversed(kept))  # in place: workers hold a reference to this deque
            dropped.extend(self._delayed.remove_if(lambda w: id(w.state) in wanted))
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

    def close_intake(self) -> None:
        """Start nothing more (poll thread; at shutdown or after a fatal error).

        The bound drops to 0 permits: each worker gives its permit back after its current message (the
        shrink path of :meth:`resize`), so neither a backlog message nor a due retry starts again.
        """
        with self._lock:
            self._permits.limit = 0
            self._changed.notify_all()

    @property
    def backlog(self) -> int:
        """Messages waiting for a thread, including those waiting for a retry."""
        return len(self._backlog) + len(self._delayed)

    @property
    def delayed(self) -> int:
        """Failed messages waiting for their backoff to pass (they hold no thread)."""
        return len(self._delayed)

    def shutdown(self, wait: bool) -> None:
        self.purge()
        self._executor.shutdown(wait=wait, cancel_futures=True)

    # -- worker side ------------------------------------------------------------------------------

    def _promote_due(self, now: float) -> int:
        """Caller holds the lock. Due retries go to the front: they are older than anything fetched since."""
        due = self._delayed.pop_due(now)
        if due:
            self._backlog.extendleft(reversed(due))
        return len(due)

    def _work(self) -> None:
        """Hold one permit and run backlog messages until none is left (the permit always comes back)."""
        try:
            self._work_loop()
        except BaseException:
            # _work_loop returns only after giving its permit back; anything escaping it still holds one
            with self._lock:
                self._permits.release()
                self._changed.notify_all()
            logger.exception("worker stopped by an unexpected error")
            raise

    def _work_loop(self) -> None:
        """The hot path takes a message without the lock (deque.popleft is atomic); only giving the
        permit back needs the lock, to re-check the backlog against a concurrent put().
        """
        handler = self._handler
        retry = self._retry
        delayed = self._delayed
        lock = self._lock
        backlog = self._backlog
        permits = self._permits
        done = self.completions.append
        started = time.monotonic()
        handled = 0
        while True:
            if delayed:  # a retry may be due: checked without the lock, promoted under it
                due = delayed.next_due()
                if due is not None and due <= time.monotonic():
                    with lock:
                        self._promote_due(time.monotonic())
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
                        if handled:
                            sample = (time.monotonic() - started) / handled
                            old = self._per_message
                            self._per_message = sample if old is None else 0.7 * old + 0.3 * sample
                        return
                continue
            handled += 1
            self._takes += 1
            if len(backlog) <= self._drain_mark:
                with lock:
                    self._changed.notify_all()
            try:
                result = handler(work.message)
                if result is not None:
                    # A returned awaitable (e.g. a coroutine) means the work never ran: a failure, not done.
                    refused = awaitable_result_error(result)
                    if refused is not None:
                        raise NotRunError(refused)
            except BaseException as err:
                # Any handler failure -- BaseExceptions too (SystemExit, KeyboardInterrupt or a
                # CancelledError leaking from library code) -- is retried and then goes to ON_FAILURE:
                # it must not kill the worker, lose its permit or strand its partition's commit.
                work.attempts += 1
                work.error = describe_error(err)
                msg = work.message
                if work.state.alive and retry.should_retry(work.attempts):
                    delay = retry.delay(work.attempts)
                    logger.warning(
                        "handler failed for %s[%d]@%d (attempt %d of %d): %s; retrying in %.2fs",
                        msg.topic(), msg.partition(), work.offset, work.attempts, retry.max_attempts,
                        work.error, delay, exc_info=logger.isEnabledFor(logging.DEBUG),
                    )
                    with lock:
                        self._delayed.push(time.monotonic() + delay, work)
                        self.retried += 1
                    continue
                work.failed = True
                logger.error(
                    "handler failed for %s[%d]@%d (attempt %d of %d): %s",
                    msg.topic(), msg.partition(), work.offset, work.attempts, retry.max_attempts, work.error,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
            done(work)
