"""Bounded concurrency: a scheduler of waiting Works, ``max_thread_count`` permits, a runner's workers.

The poll thread puts fetched Works into the scheduler (:mod:`mtc75.core.scheduler`, the only place waiting
Works live); a Work starts only when a permit is free. A worker holding a permit keeps taking the next Work
until none is ready, and only then gives its permit back, so a busy pool never waits for the poll thread.
Everything a worker does between two Works is one step of its *shift* generator (:meth:`Dispatcher.shift`);
calling the handler is the invoker's (:mod:`mtc75.runtime.invoker`), where it runs the runner's
(:mod:`mtc75.runtime.runner`).

Fast handlers: a started worker is a thread woken to compete for the GIL, so :meth:`Dispatcher.put` starts
only the workers needed to drain the backlog within ``DRAIN_TARGET`` at the measured handler time per message
(all of them for handlers of ``FAST_HANDLER`` or slower, and until a first measure), and the poll thread's
:meth:`Dispatcher.release_due` starts the rest once the backlog stops moving for ``STALL_SECONDS``. Where
scheduler and runner take chunks (mtc75/core/work.py), a fast handler's fetched partition runs are cut into
chunks of ``CHUNK_TARGET`` worth of handler time, which a worker takes, runs and completes as one. A chunk that
failed in part or was cut short (the handler turned slow) is split: what succeeded completes, each failed
message is settled alone, the rest goes back as single messages and the time per message is forgotten.

Failures: a raise schedules a retry per :class:`mtc75.core.retry.RetryPolicy` in a delay queue, holding no
thread but keeping its place in the scheduler (an ordered scheduler keeps its key blocked); after the last
attempt the Work goes to the completion queue marked failed. A Work of an assignment being given up
(:meth:`Dispatcher.retire`) is never retried nor put back: it comes back failed or dropped.

Thread contract: the poll thread calls everything public except the shift; workers only drive their shift.
``completions`` is appended by workers and drained by the poll thread alone (every Kafka call is the poll
thread's). One lock guards the permits, the delay queue and every scheduler call except ``take`` and
``release`` on a scheduler that declares them lock-free (the FIFOs: mtc75/core/scheduler.py). Counts read
without the lock are hints; a worker giving its permit back re-checks them under the lock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable

from mtc75.core.offsets import PartitionState
from mtc75.core.retry import DelayQueue, RetryPolicy
from mtc75.core.scheduler import FifoScheduler, Scheduler
from mtc75.core.work import Work
from mtc75.runtime.async_runner import runner_for
from mtc75.runtime.handlers import describe_error
from mtc75.runtime.invoker import Invoker, Partial
from mtc75.runtime.permits import Permits
from mtc75.runtime.runner import Runner, RunnerFactory, Shift

logger = logging.getLogger(__name__)

# Extra started threads only fight for the GIL (BENCHMARKS.md, "Runs across the thread boundary").
DRAIN_TARGET = 0.001  # seconds within which the started workers should drain the backlog
FAST_HANDLER = 0.0001  # seconds per message below which put() starts only the workers needed
MIN_ACTIVE = 2  # workers a fast backlog gets at least
STALL_SECONDS = 0.005  # no message taken for this long while work waits: start every free worker
# A chunk's handler time: what one worker drains within DRAIN_TARGET, so that each worker put() starts
# gets about one chunk (longer chunks measured no faster; BENCHMARKS.md).
CHUNK_TARGET = DRAIN_TARGET
SMOOTHING = 0.3  # weight of the newest Work in the measured time per message


class Dispatcher:
    """Runs the invoker's handler on at most ``max_thread_count`` workers at once."""

    def __init__(
        self,
        invoker: Invoker,
        max_thread_count: int,
        retry: RetryPolicy | None = None,
        *,
        scheduler: Scheduler | None = None,
        runner: RunnerFactory | None = None,
    ) -> None:
        self._retry = retry if retry is not None else RetryPolicy(max_attempts=1, base=0.0, cap=0.0)
        self._lock = threading.Lock()
        self._permits = Permits(max_thread_count)
        self._scheduler: Scheduler = scheduler if scheduler is not None else FifoScheduler()
        # The scheduler's take/release, bound once: lock-free where its class allows it (the FIFOs).
        self._take = self._scheduler.take if self._scheduler.LOCK_FREE_TAKE else self._locked_take
        self._release = self._scheduler.release if self._scheduler.LOCK_FREE_RELEASE else self._locked_release
        self._delayed: DelayQueue[Work] = DelayQueue()  # failed Works waiting for their next attempt
        self.retried = 0  # retries scheduled (a message failing 3 times with 3 attempts counts 2)
        # Notified when a worker gives its permit back, and when the backlog falls to _drain_mark.
        self._changed = threading.Condition(self._lock)
        self._drain_mark = -1  # backlog length a waiter wants to hear about (-1: nobody waits)
        self.completions: deque[Work] = deque()  # appended by workers, drained by the poll thread
        self._done = self.completions.append
        # Handler seconds per message (smoothed): written by workers per Work without a lock (a lost
        # update is one sample), None until measured and after a chunk was cut short.
        self._per_message: float | None = None
        self._takes = 0  # messages taken by workers (no lock: only compared for a change)
        self._takes_seen = 0  # poll thread: _takes at its last look
        self._takes_at = 0.0  # poll thread: when _takes last changed
        self._wake = False  # a worker handed messages back: the poll thread starts free workers for them
        invoker.report_work_to(self)
        self._runner: Runner = (runner or runner_for(invoker))(self, invoker, max_thread_count)
        self._chunks = self._scheduler.takes_chunks and self._runner.takes_chunks

    # -- poll-thread side -------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        """Queue fetched Works, cut to this dispatcher's chunk size, and start workers for them."""
        with self._lock:
            size = self.chunk_size
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
                wanted = min(wanted, len(units))  # a worker per chunk at most
            starts = self._permits.acquire(wanted)
        self._runner.spawn(starts)

    @property
    def chunk_size(self) -> int:
        """Messages per Work put() cuts now: 1 unless chunks are on and the handler is fast."""
        per = self._per_message
        if not self._chunks or per is None or per >= FAST_HANDLER:
            return 1
        return max(1, int(CHUNK_TARGET / max(per, 1e-7)))

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
        """Start every free worker when Works wait and none was taken for STALL_SECONDS, or when a
        worker handed messages back (a chunk cut short)."""
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

    def purge(self) -> list[Work]:
        """Drop every Work not yet started (shutdown, a re-created topic) and return them."""
        with self._lock:
            return self._purge(None)

    def retire(self, states: Iterable[PartitionState]) -> list[Work]:
        """Give these assignments up (revoke, lost): drop their unstarted Works and return them, and from
        now on neither retry nor put back any Work of theirs (it completes failed, or dropped) -- one step,
        so no retry can slip in between. Running handlers go on; their completions still count.
        """
        wanted = set(states)
        with self._lock:
            for state in wanted:
                state.closing = True
            return self._purge(wanted)

    def _purge(self, states: set[PartitionState] | None) -> list[Work]:
        """Caller holds the lock. Unstarted Works (of ``states``, or all); retries among them are released
        (they were taken once). A worker taking lock-free meanwhile may still get one: it then counts as
        started, and its completion arrives (late, if the state is gone)."""
        if states is None:
            dropped = self._scheduler.purge()
            retries = self._delayed.remove_if(lambda _w: True)
        else:
            dropped = self._scheduler.purge(lambda w: w.state in states)
            retries = self._delayed.remove_if(lambda w: w.state in states)
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
        ``timeout`` passes: the poll thread sleeps on the pool, not in ``poll()``, and wakes the moment
        the workers catch up. ``mark=-1`` waits only for a worker to go idle."""
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
        """Change the bound on running handlers. Growing takes the new permits at once; shrinking never
        interrupts a handler: a worker gives its permit back after its current Work while more are held
        than the new limit."""
        if limit < 1:
            raise ValueError(f"max_thread_count must be >= 1, got {limit}")
        self._runner.grow(limit)
        with self._lock:
            self._permits.limit = limit
            starts = self._permits.acquire(self._scheduler.ready)
        self._runner.spawn(starts)

    def cancel_running(self, states: Iterable[PartitionState]) -> None:
        """Stop the running handlers of these assignments where the runner can (coroutines; threads run
        on and their completions are dropped as late)."""
        self._runner.cancel(states)

    @property
    def workers(self) -> str:
        """What the bound counts: ``"threads"`` or ``"coroutines"``."""
        return self._runner.workers

    def close_intake(self) -> None:
        """Start nothing more (at shutdown or after a fatal error): the bound drops to 0 permits, and each
        worker gives its permit back after its current Work."""
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

    # -- worker side (the runner's workers; see mtc75/runtime/runner.py) -------------------------------

    def work_ended(self, seconds: float, messages: int) -> None:
        """The invoker's report of a Work (any worker thread): the handler time per message."""
        if messages:
            sample = seconds / messages
            old = self._per_message
            self._per_message = sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample

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

        The runner drives it: ``work = next(shift)``, run it, ``work = shift.send(outcome)`` ... until
        StopIteration (the permit went back). A generator rather than two methods per Work: its locals
        stay bound for the whole shift, and one resume costs less than two calls (BENCHMARKS.md).
        Whatever escapes -- a scheduler bug, or the runner closing it -- gives the permit back first.
        """
        permits = self._permits
        take = self._take
        release = self._release
        done = self._done
        scheduler = self._scheduler
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
                    if self._give_back():
                        holding = False
                        return
                    continue
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

    def _give_back(self) -> bool:
        """Nothing ready (or the bound shrank): give the permit back unless work turned up meanwhile."""
        # Let the poll thread run once first: with fast handlers it is usually refilling the backlog
        # right now, and a restart costs a spawn.
        time.sleep(0)
        scheduler, permits = self._scheduler, self._permits
        if scheduler.ready and permits.in_use <= permits.limit:
            return False
        with self._lock:
            if scheduler.ready and permits.in_use <= permits.limit:
                return False  # a put() came in between: its acquire saw this permit still held
            permits.release()
            self._changed.notify_all()
            return True

    def _settle_partial(self, work: Work, outcome: Partial) -> None:
        """A chunk came back failed in part or cut short: complete what succeeded, settle each failed
        message alone, and put the rest back as single messages (see the module notes)."""
        if outcome.handled < work.size:  # first, so that the free workers can start on it at once
            rest = work.part(outcome.handled, work.size).split(1)
            with self._lock:
                if work.state.closing or not work.state.alive:  # given up: never run, never committed
                    for piece in rest:
                        piece.failed = piece.dropped = True
                        self._done(piece)
                else:
                    self._scheduler.requeue(rest)
                    self._per_message = None  # slow now: single messages and every free worker until measured
                    self._wake = True
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
        with self._lock:
            # ``closing`` is set under this lock (retire): a retry either lands in the delay queue before
            # the purge that follows, or is never scheduled.
            now = time.monotonic()
            delay = retry.next_delay(work, now) if work.state.alive and not work.state.closing else None
            again = delay is not None
            if delay is not None:
                # not released: an ordered scheduler keeps its key blocked meanwhile
                self._delayed.push(now + delay, work)
                self.retried += 1
        if again:
            logger.warning(
                "handler failed for %s[%d]@%d (attempt %d of %d): %s; retrying in %.2fs",
                msg.topic(), msg.partition(), work.offset, work.attempts, retry.max_attempts,
                work.error, delay, exc_info=_traceback(error),
            )
            return
        work.failed = True
        # A Work of an assignment being given up is not this consumer's failure: the next owner runs it; nor
        # one the policy declined with attempts left (share mode: its caller says what becomes of it).
        final = work.state.alive and not work.state.closing and not retry.should_retry(work.attempts)
        logger.log(
            logging.ERROR if final else logging.DEBUG,
            "handler failed for %s[%d]@%d (attempt %d of %d): %s",
            msg.topic(), msg.partition(), work.offset, work.attempts, retry.max_attempts, work.error,
            exc_info=_traceback(error),
        )
        self._release(work)
        self._done(work)


def _traceback(error: BaseException) -> tuple[type[BaseException], BaseException, object] | None:
    """The handler's traceback for a DEBUG logger (``exc_info`` outside an ``except`` must be explicit)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return None
    return type(error), error, error.__traceback__
