"""Bounded concurrency: a scheduler of waiting Works, ``max_thread_count`` permits, a runner's workers.

The poll thread puts fetched Works into the scheduler (:mod:`mtc75.core.scheduler`, the only place waiting
Works live); a Work starts only when a permit is free. A worker holding a permit keeps taking the next Work
until none is ready, and only then gives its permit back, so a busy pool never waits for the poll thread.
Everything a worker does between two Works is one step of its *shift* generator (:meth:`Dispatcher.shift`);
calling the handler is the invoker's (:mod:`mtc75.runtime.invoker`), where it runs the runner's
(:mod:`mtc75.runtime.runner`). Its collaborators, one concern each:

- :mod:`mtc75.runtime.pacing`: how many workers to start, and how many messages a chunk holds;
- :mod:`mtc75.runtime.throttle`: MAX_RATE / KEY_RATE, paid by a worker before the handler runs;
- :mod:`mtc75.runtime.retries`: a raise becomes a retry in the delay queue, or the last failure;
- :mod:`mtc75.runtime.batches`: a batch handler's batches, run again or settled in pieces;
- :mod:`mtc75.runtime.pieces`: a chunk or an ordered run that failed in part or was cut short, split.

A Work of an assignment being given up (:meth:`Dispatcher.retire`) is never retried nor put back: it comes
back failed or dropped.

Thread contract: the poll thread calls everything public except the shift; workers only drive their shift.
``completions`` is appended by workers and drained by the poll thread alone (every Kafka call is the poll
thread's). One lock, shared with the collaborators, guards the permits, the delay queue and every scheduler
call except ``take`` and ``release`` on a scheduler that declares them free of it (the FIFOs take under a
small lock of their own: mtc75/core/scheduler.py). Counts read without the lock are hints; a worker giving its
permit back re-checks them under the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from mtc75.core.batching import BatchScheduler
from mtc75.core.offsets import PartitionState
from mtc75.core.retry import DelayedWorks, RetryPolicy
from mtc75.core.scheduler import FifoScheduler, Scheduler
from mtc75.core.work import Work
from mtc75.runtime.async_runner import runner_for
from mtc75.runtime.batches import Batches
from mtc75.runtime.failurehook import FailureHook
from mtc75.runtime.invoker import Invoker, Partial
from mtc75.runtime.pacing import Pacing
from mtc75.runtime.permits import Permits
from mtc75.runtime.pieces import Pieces, ordered_runs
from mtc75.runtime.retries import Retries
from mtc75.runtime.runner import Runner, RunnerFactory, Shift
from mtc75.runtime.throttle import Throttle

logger = logging.getLogger(__name__)


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
        clock: Callable[[], float] = time.monotonic,
        failure_hook: FailureHook | None = None,
    ) -> None:
        self._clock = clock  # due times of the delay queue and the rate limits (tests: a fake)
        self._lock = threading.Lock()
        self._permits = Permits(max_thread_count)
        self._scheduler: Scheduler = scheduler if scheduler is not None else FifoScheduler()
        # The scheduler's take/release, bound once: free of the dispatcher's lock where its class allows it.
        self._take = self._scheduler.take if self._scheduler.LOCK_FREE_TAKE else self._locked_take
        self._release = self._scheduler.release if self._scheduler.LOCK_FREE_RELEASE else self._locked_release
        self._delayed = DelayedWorks()  # failed Works waiting for their next attempt, throttled ones for tokens
        self.completions: deque[Work] = deque()  # appended by workers, drained by the poll thread
        self._done = self.completions.append
        self.pacing = Pacing()
        self._batches: Batches | None = None
        if isinstance(self._scheduler, BatchScheduler):
            self._batches = Batches(self._scheduler, self._lock, clock, self._done, self.pacing,
                                    keep_errors=failure_hook is not None)
            self._take = self._batches.take
        self.throttle = Throttle(self._lock, clock, self._scheduler, self._delayed, self._finished)
        self._retries = Retries(retry if retry is not None else RetryPolicy(max_attempts=1, base=0.0, cap=0.0),
                                self._lock, clock, self._delayed, failure_hook, self._batches, self._finished)
        if self._batches is not None:
            self._batches.fail = self._retries.fail
        # Notified when a worker gives its permit back, and when the backlog falls to _drain_mark.
        self._changed = threading.Condition(self._lock)
        self._drain_mark = -1  # backlog length a waiter wants to hear about (-1: nobody waits)
        self._takes = 0  # messages taken by workers (no lock: only compared for a change)
        invoker.report_work_to(self.pacing)
        self._runner: Runner = (runner or runner_for(invoker))(self, invoker, max_thread_count)
        self._lanes = ordered_runs(self._scheduler, self._runner.takes_chunks, invoker)
        self.pacing.chunks = (self._scheduler.takes_chunks or self._lanes is not None) and self._runner.takes_chunks
        self._pieces = Pieces(self._lock, self._scheduler, self._lanes, self._batches, self.throttle, self.pacing,
                              self._retries, self._done, self._release)

    # -- poll-thread side -------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        """Queue fetched Works (cut to this dispatcher's chunk size; batches form in their scheduler) and
        start workers for them."""
        with self._lock:
            now = self._clock()
            batches = self._batches
            if batches is not None:
                units = list(items)
                batches.put(units, now)
            elif self._lanes is not None:  # fetched runs go in whole: runs form again when a lane is taken
                self._lanes.take_cap = self.chunk_size
                units = list(items)
                self._lanes.put(units)
            else:
                size = self.chunk_size
                units = []
                for work in items:
                    if work.size > size:
                        units.extend(work.split(size))
                    else:
                        units.append(work)
                self._scheduler.put(units)
            if self._delayed:
                self._promote_due(now)
            wanted = self._wanted_now()
            if batches is None and self._lanes is None and self.chunk_size > 1:
                wanted = min(wanted, len(units))  # a worker per chunk at most
            starts = self._permits.acquire(wanted)
        self._runner.spawn(starts)

    @property
    def unit(self) -> int:
        """Messages a worker takes at a time at most: the batch size for a batch handler, else 1."""
        return self._batches.unit if self._batches is not None else 1

    @property
    def chunk_size(self) -> int:
        """Messages per Work put() cuts now: 1 unless chunks are on and the handler is fast."""
        return self.pacing.chunk_size(self.throttle.chunk_cap)

    def _wanted_now(self) -> int:
        """Caller holds the lock. Workers to start for what may be taken now (:mod:`mtc75.runtime.pacing`)."""
        if self._batches is not None:
            return self._batches.startable
        return self.pacing.wanted(self._scheduler.ready, self._permits.in_use)

    def _startable(self) -> int:
        """Caller holds the lock. Workers to start for everything ready: per batch, or per message."""
        return self._batches.startable if self._batches is not None else self.ready

    def release_due(self) -> None:
        """Start workers for retries whose backoff has passed, and for a backlog that stopped moving.

        Called by the poll thread on every loop turn.
        """
        batches = self._batches
        if not self._delayed and (batches is None or not batches.due()):
            self._unstall()
            return  # the common case, checked without the lock
        with self._lock:
            now = self._clock()
            self._promote_due(now)
            if batches is not None:
                batches.promote(now)
            # also covers retries a busy worker promoted: it took no permits for them
            starts = self._permits.acquire(self._startable())
        self._runner.spawn(starts)

    def _unstall(self) -> None:
        """Start every free worker when Works wait and none was taken for a while, or when a worker handed
        messages back (:meth:`mtc75.runtime.pacing.Pacing.stalled`)."""
        if not self.ready or self._permits.in_use >= self._permits.limit:
            return  # hints read without the lock: a wrong reading only delays this to the next turn
        if not self.pacing.stalled(self._takes, time.monotonic()):
            return
        with self._lock:
            starts = self._permits.acquire(self._startable())
        self._runner.spawn(starts)

    def limit_rates(self, max_rate: float, key_rate: float, burst: float) -> None:
        """Set MAX_RATE and KEY_RATE (0: off) and RATE_BURST. The throttled Works give their tokens back
        and go back in front of the scheduler, to pay again under the new limits."""
        with self._lock:
            waiting = self.throttle.retune(max_rate, key_rate, burst)
            if waiting is None:
                return
            if waiting:
                self._put_back(waiting, front=True)
            starts = self._permits.acquire(self._wanted_now())
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
        (they were taken once). A worker taking without the lock meanwhile may still get one: it then counts
        as started, and its completion arrives (late, if the state is gone)."""
        def chosen(work: Work) -> bool:
            return states is None or work.state in states

        dropped = self._scheduler.purge(None if states is None else chosen)
        for work in dropped:
            if work.attempts or work.paid:  # a retry or throttled Work requeued and not taken again: taken once
                self._scheduler.release(work)
        taken = self._delayed.remove_if(chosen)  # retries, throttled Works (with batches: their pieces too)
        if taken and self.throttle.throttled:
            self.throttle.unpark(taken, self._clock())
        batches = self._batches
        if batches is not None:
            taken.extend(batches.purge(chosen))
        untake = batches.untake if batches is not None else self._scheduler.release
        for work in taken:
            untake(work)
        dropped.extend(taken)
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
            if self._waiting() <= mark:
                return True
            self._drain_mark = mark
            self._changed.wait(timeout)
            self._drain_mark = -1
            return self._waiting() <= mark

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
            starts = self._permits.acquire(self._startable())
        self._runner.spawn(starts)

    def retune_batches(self, size: int, wait: float) -> None:
        """BATCH_SIZE and BATCH_WAIT changed live (batch mode only): from the next batch on."""
        if self._batches is not None:
            self._batches.retune(size, wait)

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

    def _waiting(self) -> int:
        """Messages waiting to be taken: in the scheduler, and to run again (a hint)."""
        batches = self._batches
        return len(self._scheduler) if batches is None else len(self._scheduler) + batches.messages

    @property
    def backlog(self) -> int:
        """Messages waiting for a worker (ready or blocked), including those waiting for a retry or rate tokens."""
        return self._waiting() + self._delayed.messages

    @property
    def ready(self) -> int:
        """Waiting messages a worker could start now (a hint: read without the lock)."""
        batches = self._batches
        return self._scheduler.ready if batches is None else self._scheduler.ready + batches.messages

    @property
    def blocked(self) -> int:
        """Waiting messages held back behind a running one of their key or partition (a hint)."""
        return self._scheduler.blocked

    @property
    def delayed(self) -> int:
        """Messages waiting for a time (holding no thread): failed ones for their backoff to pass, throttled
        ones for their rate tokens."""
        return self._delayed.messages

    @property
    def retried(self) -> int:
        """Retries scheduled (a message failing 3 times with 3 attempts counts 2)."""
        return self._retries.count

    def due_in(self) -> float | None:
        """Seconds until the next delayed message or waiting batch is due (None: none waits): the poll thread
        wakes for it. A hint read without the lock."""
        due = self._delayed.next_due()
        if self._batches is not None:
            batch_due = self._batches.scheduler.next_due()
            if batch_due is not None and (due is None or batch_due < due):
                due = batch_due
        return None if due is None else due - self._clock()

    def shutdown(self, wait: bool) -> None:
        self.purge()
        self._runner.shutdown(wait)

    # -- worker side (the runner's workers; see mtc75/runtime/runner.py) -------------------------------

    def _locked_take(self) -> Work:
        with self._lock:
            return self._scheduler.take()

    def _locked_release(self, work: Work) -> None:
        with self._lock:
            self._scheduler.release(work)

    def _promote_due(self, now: float) -> None:
        """Caller holds the lock. Due retries and throttled Works go back, before anything fetched since (a
        throttled one starts without paying again)."""
        due = self._delayed.pop_due(now)
        if due:
            self.throttle.unpark(due, now)
            self._put_back(due)

    def _put_back(self, works: list[Work], front: bool = False) -> None:
        """Caller holds the lock. Taken Works to run again: a batch handler's through the rework queue (they
        hold their lanes), others in front of the scheduler."""
        if self._batches is not None:
            self._batches.put_back(works, front)
        else:
            self._scheduler.requeue(works)

    def _finished(self, work: Work) -> None:
        """``work`` is done for good (succeeded, failed its last attempt, or dropped): whatever it blocked
        may run, and it goes to the completion queue."""
        if work.batch is None:
            self._release(work)
            self._done(work)
        else:
            assert self._batches is not None
            self._batches.settled(work)

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
        batches = self._batches
        throttle = self.throttle
        fail = self._retries.fail
        settle = self._pieces.settle
        holding = True
        try:
            while True:
                delayed = self._delayed
                if delayed:  # a retry may be due: checked without the lock, promoted under it
                    due = delayed.next_due()
                    if due is not None and due <= self._clock():
                        with self._lock:
                            self._promote_due(self._clock())
                if batches is not None and batches.due():  # a batch waited long enough to fill
                    with self._lock:
                        batches.promote(self._clock())
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
                if throttle.rates is not None and not throttle.admit(work):
                    continue  # it waits for its rate tokens without this worker
                outcome = yield work
                if outcome is None:  # done for good: whatever it blocked may run
                    if work.batch is None:
                        release(work)
                        done(work)
                    else:
                        batches.settled(work)  # a piece: batch mode only
                elif isinstance(outcome, Partial):
                    settle(work, outcome)
                else:
                    fail(work, outcome)
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
        permits = self._permits
        if self.ready and permits.in_use <= permits.limit:
            return False
        with self._lock:
            if self.ready and permits.in_use <= permits.limit:
                return False  # a put() came in between: its acquire saw this permit still held
            permits.release()
            self._changed.notify_all()
            return True
