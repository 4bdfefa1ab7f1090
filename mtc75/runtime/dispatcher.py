"""Bounded concurrency: a scheduler of waiting messages, ``max_thread_count`` permits, a runner's workers.

Thread contract. The poll thread (the dispatcher's owner) calls everything public except the worker
steps: ``put``, ``release_due``, ``purge``, ``resize``, ``close_intake``, ``shutdown``, the waits and
the counts. The runner's workers only drive their ``shift()`` generator (the worker steps: take the
next message, settle the last one). ``completions`` is appended by workers and drained by the poll thread alone.
One lock (``_lock``) guards the permits, the retry delay queue and every scheduler call, except
``take`` and ``release`` on a scheduler that declares them lock-free (``LOCK_FREE_TAKE`` /
``LOCK_FREE_RELEASE``, the FIFO: see mtc75/core/scheduler.py for what that promises). Counts read
without the lock (``len``/``ready`` of the scheduler, ``len`` of the delay queue, ``_takes``, the
permits) are hints: every decision that could strand a message -- a worker giving its permit back --
re-checks them under the lock.

The poll thread puts fetched messages into the scheduler (:mod:`mtc75.core.scheduler`, the only
place waiting messages live); a message starts only when a permit is free. A worker that holds a
permit keeps taking the next message until none is ready, and only then gives its permit back, so a
busy pool never waits for the poll thread to hand out work. With the FIFO, taking a message needs no
lock (``deque.popleft`` is atomic); giving a permit back and adding work share one lock, so "nothing
ready, release" and "put, acquire" cannot race.

The workers come from a runner (:mod:`mtc75.runtime.runner`; threads today): a worker loops
"next message" -> handler -> "settle it" through its shift (:meth:`Dispatcher.shift`), and all
permit, scheduler and retry bookkeeping is in those steps, so another runner (asyncio) can sit
beside the thread one.

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
waits for its backoff in a delay queue, holding no thread (but still holding its place in the
scheduler: it is not released), and re-enters the scheduler through ``requeue`` when due (checked by
workers looking for work and by the poll thread's :meth:`Dispatcher.release_due`). Only after its
last attempt is it released and put on the completion queue, marked failed, for the poll thread to
dead-letter, skip or stop on. A purged retry (revoke, shutdown) is released too.

Ordering modes plug a scheduler that hands out only messages whose key (or partition) has nothing
running in through ``Dispatcher(scheduler=...)``; the permit and worker logic stays as it is.

Runs across the thread boundary (mtc75/core/work.py). The poll thread puts one ``Work`` per fetched
partition run; for fast handlers (measured under ``FAST_HANDLER`` per message) on a scheduler and a
runner that take runs, :meth:`Dispatcher.put` cuts them into runs of ``RUN_TARGET`` worth of messages
(at the measured time per message), which a worker takes, runs and completes as one; otherwise into
single messages, as before. A run that fails in part, or that its runner cut short because the handler
turned slow (mtc75/runtime/runner.py, ``RUN_SECONDS``), is split: what succeeded completes, each failed
message is settled alone (retry, ON_FAILURE), and the rest goes back to the front of the scheduler as
single messages, with the time per message forgotten (so the next puts cut single messages and start
every free worker) and the poll thread asked to start free workers for them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from mtc75.core.offsets import PartitionState
from mtc75.core.retry import DelayQueue, RetryPolicy
from mtc75.core.scheduler import FifoScheduler, Scheduler
from mtc75.core.work import Work
from mtc75.runtime.handlers import Handler, NotRunError, describe_error
from mtc75.runtime.permits import Permits
from mtc75.runtime.runner import Partial, Runner, Shift, ThreadRunner, WorkerSteps

__all__ = [
    "DRAIN_TARGET", "FAST_HANDLER", "MIN_ACTIVE", "STALL_SECONDS", "Dispatcher", "Handler", "NotRunError",
    "Permits", "RunnerFactory", "Work", "describe_error",
]

logger = logging.getLogger(__name__)

# Builds the runner for a dispatcher: (its worker steps, the handler, max_thread_count) -> Runner.
RunnerFactory = Callable[[WorkerSteps, Handler, int], Runner]

# Measured with a no-op handler (bench/child.py, lz4 100 B, 500 000 messages): 75 started threads cost
# 9.9 us of CPU per message, 4 threads 5.2 us, for the same work; the extra threads only fought for the GIL.
DRAIN_TARGET = 0.001  # seconds within which the started workers should drain the backlog
FAST_HANDLER = 0.0001  # seconds per message below which put() starts only the workers needed
MIN_ACTIVE = 2  # workers a fast backlog gets at least
STALL_SECONDS = 0.005  # no message taken for this long while work waits: start every free worker
# A run's length in handler time (runs: see the module notes): what one worker drains within
# DRAIN_TARGET, so that the workers put() starts for a backlog each get about one run. Measured on lz4
# 100 B, 1 000 000 messages, no-op handler (bench/child.py engine, 75 threads, 2026-11-27 04:50 UTC,
# load < 1; msg/s, passes in the same minutes; the raw loop did 364-397k): 0.05 ms 136-206k,
# 0.5 ms 270-280k, 1 ms 345-440k, 2 ms 356-489k, 5 ms 278-384k. Longer runs gain nothing measurable
# and would run a 50 us I/O handler's messages on fewer workers than DRAIN_TARGET asks for.
RUN_TARGET = DRAIN_TARGET


class Dispatcher:
    """Runs ``handler(message)`` on at most ``max_thread_count`` workers at once."""

    def __init__(
        self,
        handler: Handler,
        max_thread_count: int,
        retry: RetryPolicy | None = None,
        *,
        scheduler: Scheduler | None = None,
        runner: RunnerFactory = ThreadRunner,
    ) -> None:
        self._retry = retry if retry is not None else RetryPolicy(max_attempts=1, base=0.0, cap=0.0)
        self._lock = threading.Lock()
        self._permits = Permits(max_thread_count)
        self._scheduler: Scheduler = scheduler if scheduler is not None else FifoScheduler()
        # The scheduler's take/release, bound once: lock-free where its class allows it (the FIFO).
        self._take = self._scheduler.take if self._scheduler.LOCK_FREE_TAKE else self._locked_take
        self._release = self._scheduler.release if self._scheduler.LOCK_FREE_RELEASE else self._locked_release
        self._delayed: DelayQueue[Work] = DelayQueue()  # failed messages waiting for their next attempt
        self.retried = 0  # retries scheduled (a message failing 3 times with 3 attempts counts 2)
        # Notified when a worker gives its permit back, and when the backlog falls to _drain_mark.
        self._changed = threading.Condition(self._lock)
        self._drain_mark = -1  # backlog length a waiter wants to hear about (-1: nobody waits)
        self.completions: deque[Work] = deque()  # appended by workers, drained by the poll thread
        self._done = self.completions.append
        self._per_message: float | None = None  # seconds a worker spends per message (smoothed), under the lock
        self._takes = 0  # messages taken by workers (no lock: only compared for a change)
        self._takes_seen = 0  # poll thread: _takes at its last look
        self._takes_at = 0.0  # poll thread: when _takes last changed
        self._wake = False  # a worker handed messages back: the poll thread starts free workers for them
        self._runner: Runner = runner(self, handler, max_thread_count)
        # Runs only where both ends take them (the ordered schedulers and the asyncio runner do not).
        self._runs = bool(getattr(self._scheduler, "RUNS", False) and getattr(self._runner, "RUNS", False))

    # -- poll-thread side -------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        """Queue fetched messages (single ones or runs) and start as many workers as there are free
        permits and work. Runs are cut to this dispatcher's run length (see the module notes)."""
        with self._lock:
            size = self._run_size()
            units: list[Work] = []
            for work in items:
                if work.size > size:
                    units.extend(work.split(size))
                else:
                    units.append(work)
            self._scheduler.put(units)
            if self._delayed:
                self._promote_due(time.monotonic())
            wanted = self._wanted(self._scheduler.ready)
            if size > 1:
                wanted = min(wanted, len(units))  # a worker per run at most
            starts = self._permits.acquire(wanted)
        self._runner.spawn(starts)

    def _run_size(self) -> int:
        """Caller holds the lock. Messages per run: 1 unless runs are on and the handler is fast."""
        per = self._per_message
        if not self._runs or per is None or per >= FAST_HANDLER:
            return 1
        return max(1, int(RUN_TARGET / max(per, 1e-7)))

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
            starts = self._permits.acquire(self._scheduler.ready)
        self._runner.spawn(starts)

    def _unstall(self) -> None:
        """Start every free worker when messages wait and none was taken for STALL_SECONDS, or when a
        worker handed messages back (a run cut short)."""
        if not self._scheduler.ready or self._permits.in_use >= self._permits.limit:
            return  # hints read without the lock: a wrong reading only delays this to the next turn
        now = time.monotonic()
        if self._wake:
            self._wake = False
        elif self._takes != self._takes_seen:
            self._takes_seen, self._takes_at = self._takes, now
            return
        elif now - self._takes_at < STALL_SECONDS:
            return
        with self._lock:
            starts = self._permits.acquire(self._scheduler.ready)
        self._takes_at = now
        self._runner.spawn(starts)

    def purge(self, states: Iterable[PartitionState] | None = None) -> list[Work]:
        """Drop messages not yet started (of the given assignments, or all) and return them.

        Dropped messages were never handled and are never committed, so the next owner reads them
        again. That includes retries waiting out a backoff or requeued: they were taken once, so the
        scheduler releases them here. A worker taking lock-free while this runs may still get a message of a
        dropped assignment; it then counts as started (its completion arrives late and is dropped).
        """
        with self._lock:
            if states is None:
                dropped = self._scheduler.purge()
                retries = self._delayed.remove_if(lambda _w: True)
            else:
                wanted = set(map(id, states))
                dropped = self._scheduler.purge(lambda w: id(w.state) in wanted)
                retries = self._delayed.remove_if(lambda w: id(w.state) in wanted)
            dropped.extend(retries)
            for work in dropped:
                if work.attempts:  # a retry (delayed, or requeued and not taken again): it was taken
                    self._scheduler.release(work)
            if dropped:
                self._changed.notify_all()  # a wait_backlog_at_most may now be satisfied
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
        """Block until at most ``mark`` messages wait in the scheduler (or a worker went idle), or
        ``timeout`` passes.

        Lets the poll thread sleep on the pool instead of in ``poll()``, and wake the moment the
        threads catch up. ``mark=-1`` waits only for a worker to go idle. The length is read under
        the lock here; a worker taking lock-free reads it without (a hint: it only decides whether to
        notify, and a missed notification costs at most ``timeout``).
        """
        with self._changed:
            if len(self._scheduler) <= mark:
                return True
            self._drain_mark = mark
            self._changed.wait(timeout)
            self._drain_mark = -1
            return len(self._scheduler) <= mark

    @property
    def active_thread_count(self) -> int:
        """ACTIVE_THREAD_COUNT: permits held by workers running (or about to run) a handler."""
        return self._permits.in_use

    @property
    def max_active_threads(self) -> int:
        return self._permits.max_in_use

    @property
    def max_thread_count(self) -> int:
        return self._permits.limit

    def resize(self, limit: int) -> None:
        """Change the bound on running handlers (poll thread only).

        Growing takes the new permits at once (the runner grows first). Shrinking never interrupts a
        handler: a worker gives its permit back after its current message while more permits are
        held than the new limit, so no new message starts until the excess has drained.
        """
        if limit < 1:
            raise ValueError(f"max_thread_count must be >= 1, got {limit}")
        self._runner.grow(limit)
        with self._lock:
            self._permits.limit = limit
            starts = self._permits.acquire(self._scheduler.ready)
        self._runner.spawn(starts)

    def cancel_running(self, states: Iterable[PartitionState]) -> None:
        """Cancel the running handlers of messages fetched under ``states`` (revoked assignments), if the
        runner can: coroutines can be cancelled (AsyncRunner), threads cannot (their completions are
        dropped as late instead). Poll thread."""
        cancel = getattr(self._runner, "cancel", None)
        if cancel is not None:
            cancel(states)

    @property
    def workers(self) -> str:
        """What the bound counts: ``"coroutines"`` on the async runner, else ``"threads"``."""
        return str(getattr(self._runner, "WORKERS", "threads"))

    def close_intake(self) -> None:
        """Start nothing more (poll thread; at shutdown or after a fatal error).

        The bound drops to 0 permits: each worker gives its permit back after its current message (the
        shrink path of :meth:`resize`), so neither a waiting message nor a due retry starts again.
        """
        with self._lock:
            self._permits.limit = 0
            self._changed.notify_all()

    @property
    def backlog(self) -> int:
        """Messages waiting for a worker (ready or blocked), including those waiting for a retry."""
        return len(self._scheduler) + len(self._delayed)

    @property
    def ready(self) -> int:
        """Waiting messages the scheduler could hand out now (a hint: read without the lock)."""
        return self._scheduler.ready

    @property
    def blocked(self) -> int:
        """Waiting messages held back behind a running one of their key or partition (a hint)."""
        return self._scheduler.blocked

    @property
    def delayed(self) -> int:
        """Failed messages waiting for their backoff to pass (they hold no thread)."""
        return len(self._delayed)

    def shutdown(self, wait: bool) -> None:
        self.purge()
        self._runner.shutdown(wait)

    # -- worker steps (called by the runner's workers; see mtc75/runtime/runner.py) ------------------

    def _locked_take(self) -> Work:
        with self._lock:
            return self._scheduler.take()

    def _locked_release(self, work: Work) -> None:
        with self._lock:
            self._scheduler.release(work)

    def _promote_due(self, now: float) -> int:
        """Caller holds the lock. Due retries go back to the scheduler, before anything fetched since."""
        due = self._delayed.pop_due(now)
        if due:
            self._scheduler.requeue(due)
        return len(due)

    def shift(self) -> Shift:
        """One worker's shift: it holds one permit from its spawn until this generator returns.

        The runner drives it: ``work = next(shift)``, call the handler, ``work = shift.send(error)``
        (None if the handler returned) ... until StopIteration, which means the permit went back.
        Everything between two handler calls happens here: settling the last message (release and
        completion, or its retry), promoting due retries, taking the next one -- lock-free on a
        lock-free scheduler; only giving the permit back needs the lock, to re-check the scheduler
        against a concurrent put(). A generator rather than two methods per message: its locals stay
        bound for the whole shift, and one resume costs less than two calls. Measured, one worker
        draining 300 000 no-op messages (CPU per message, best of 5, on the shared 2-core machine):
        the old inline loop 306-428 ns, two step methods (next_work/settle) 520-835 ns, this 381-466 ns.
        Whatever escapes -- a scheduler bug, or the runner closing it -- gives the permit back first.
        """
        permits = self._permits
        take = self._take
        release = self._release
        done = self._done
        scheduler = self._scheduler
        started = time.monotonic()
        handled = 0
        holding = True
        try:
            while True:
                delayed = self._delayed
                if delayed:  # a retry may be due: checked without the lock, promoted under it
                    due = delayed.next_due()
                    if due is not None and due <= time.monotonic():
                        with self._lock:
                            self._promote_due(time.monotonic())
                try:
                    if permits.in_use > permits.limit:
                        raise IndexError  # the bound shrank: give this permit back
                    work = take()
                except IndexError:
                    if self._give_back(started, handled):
                        holding = False
                        return
                    continue
                handled += work.size
                self._takes += work.size
                mark = self._drain_mark
                if mark >= 0 and len(scheduler) <= mark:  # -1 (nobody waits) skips the len() call
                    with self._lock:
                        self._changed.notify_all()
                outcome = yield work
                if outcome is None:  # done for good: whatever it blocked may run
                    release(work)
                    done(work)
                elif isinstance(outcome, Partial):
                    self._settle_partial(work, outcome)
                else:
                    self.settle_failure(work, outcome)
        except BaseException as exc:
            if holding:
                with self._lock:
                    self._permits.release()
                    self._changed.notify_all()
                if not isinstance(exc, GeneratorExit):
                    logger.exception("worker stopped by an unexpected error")
            raise

    def _give_back(self, started: float, handled: int) -> bool:
        """Nothing ready (or the bound shrank): give the permit back unless work turned up meanwhile."""
        # Before giving the permit back, let the poll thread run once: with fast handlers
        # it is usually refilling the backlog right now, and a restart costs a spawn.
        time.sleep(0)
        scheduler, permits = self._scheduler, self._permits
        if scheduler.ready and permits.in_use <= permits.limit:
            return False
        with self._lock:
            if scheduler.ready and permits.in_use <= permits.limit:
                return False  # a put() came in between: its acquire saw this permit still held
            if handled:
                sample = (time.monotonic() - started) / handled
                old = self._per_message
                self._per_message = sample if old is None else 0.7 * old + 0.3 * sample
            permits.release()
            self._changed.notify_all()
            return True

    def _settle_partial(self, work: Work, outcome: Partial) -> None:
        """A run came back failed in part or cut short: complete what succeeded, settle each failed
        message alone, and put the rest back as single messages (see the module notes)."""
        if outcome.handled < work.size:  # first, so that the free workers can start on it at once
            # Of a revoked assignment (state.alive, read as settle_failure does): dropped, never run
            # -- the next owner reads it again; the poll thread's purges took the rest of its run.
            rest = work.part(outcome.handled, work.size).split(1) if work.state.alive else []
            with self._lock:
                self._scheduler.requeue(rest)
                self._per_message = None  # slow now: single messages and every free worker until measured
                self._wake = bool(rest)
        done = self._done
        start = 0
        for index, error in sorted(outcome.failures, key=lambda failure: failure[0]):
            if index > start:
                done(work.part(start, index))
            self.settle_failure(work.part(index, index + 1), error)
            start = index + 1
        if outcome.handled > start:
            done(work.part(start, outcome.handled))

    def settle_failure(self, work: Work, error: BaseException) -> None:
        """The handler raised ``error`` (any BaseException): schedule a retry, or complete it failed."""
        retry = self._retry
        work.attempts += 1
        work.error = describe_error(error)
        msg = work.message
        # state.alive: the one PartitionState field workers read, without a lock (a bool the poll
        # thread writes at revoke). A stale True schedules one more retry; its completion then
        # carries a dead assignment and the poll thread drops it as late, as for any late completion.
        if work.state.alive and retry.should_retry(work.attempts):
            delay = retry.delay(work.attempts)
            logger.warning(
                "handler failed for %s[%d]@%d (attempt %d of %d): %s; retrying in %.2fs",
                msg.topic(), msg.partition(), work.offset, work.attempts, retry.max_attempts,
                work.error, delay, exc_info=error if logger.isEnabledFor(logging.DEBUG) else None,
            )
            with self._lock:  # not released: an ordered scheduler keeps its key blocked meanwhile
                self._delayed.push(time.monotonic() + delay, work)
                self.retried += 1
            return
        work.failed = True
        # A revoked assignment's message (e.g. a coroutine cancelled at revoke) is not this consumer's
        # failure: its completion is dropped and the partition's next owner runs it again.
        logger.log(
            logging.ERROR if work.state.alive else logging.DEBUG,
            "handler failed for %s[%d]@%d (attempt %d of %d): %s",
            msg.topic(), msg.partition(), work.offset, work.attempts, retry.max_attempts, work.error,
            exc_info=error if logger.isEnabledFor(logging.DEBUG) else None,  # the handler's traceback: not in an except
        )
        self._release(work)
        self._done(work)
