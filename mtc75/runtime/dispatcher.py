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
attempt the Work goes to the completion queue marked failed -- at once for a
:class:`~mtc75.errors.DeserializationError` that is not ``retriable`` (the same bytes fail the same way).
A Work of an assignment being given up (:meth:`Dispatcher.retire`) is never retried nor put back: it
comes back failed or dropped. With ``on_error`` a retry is reported (:mod:`mtc75.runtime.failurehook`: queued,
never called here) under the lock, before the retry can run; the poll thread reports the outcomes.

Rate limits (MAX_RATE, KEY_RATE: :mod:`mtc75.core.ratelimit`): a worker that takes a Work pays its tokens;
when the bucket puts its start in the future the Work goes to the delay queue, due at that start and marked
as paid, and the worker takes the next one. So a throttled message holds no thread, counts in ``backlog``
and ``delayed`` (the gate pauses fetching once such messages fill the backlog), and in an ordered mode keeps
its key's or partition's lane busy, like a retry waiting out its backoff. A change of the limits
(:meth:`Dispatcher.limit_rates`) gives the waiting messages' tokens back and puts them back in front, to
pay again at the new rates. Chunks hold at most the bucket's capacity, and single messages under KEY_RATE.
With no limit the hot path pays one attribute test per Work.

Batches (a batch handler: mtc75/core/batching.py hands them out): a batch that raised is retried whole; after
its last attempt it is split and each message runs alone, with attempts of its own; a batch whose handler named
the failed messages (BatchError) completes the rest at once and retries those alone. Taken Works that run again
(a batch's retry, its pieces) wait in the *rework* queue, which workers serve before the scheduler; the batch
keeps its lanes (ORDERING) until its last piece settled, then it is released once.

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
from collections.abc import Callable, Iterable

from mtc75.core.batching import BatchScheduler
from mtc75.core.failures import RETRY
from mtc75.core.offsets import Partition, PartitionState
from mtc75.core.ratelimit import NO_CAP, PAID_ALL, PAID_KEY, PAID_RATE, RateLimits, WaitTime, cause
from mtc75.core.retry import DelayQueue, RetryPolicy
from mtc75.core.scheduler import FifoScheduler, Scheduler
from mtc75.core.work import Work
from mtc75.errors import DeserializationError
from mtc75.runtime.async_runner import runner_for
from mtc75.runtime.failurehook import FailureHook
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
        clock: Callable[[], float] = time.monotonic,
        failure_hook: FailureHook | None = None,
    ) -> None:
        self._clock = clock  # due times of the delay queue and the rate limits (tests: a fake)
        self._retry = retry if retry is not None else RetryPolicy(max_attempts=1, base=0.0, cap=0.0)
        self._lock = threading.Lock()
        self._permits = Permits(max_thread_count)
        self._scheduler: Scheduler = scheduler if scheduler is not None else FifoScheduler()
        # The scheduler's take/release, bound once: lock-free where its class allows it (the FIFOs).
        self._take = self._scheduler.take if self._scheduler.LOCK_FREE_TAKE else self._locked_take
        self._release = self._scheduler.release if self._scheduler.LOCK_FREE_RELEASE else self._locked_release
        # Works waiting for a time: failed ones for their next attempt, throttled ones for their rate tokens
        self._delayed: DelayQueue[Work] = DelayQueue()
        self._delayed_messages = 0  # their messages (a chunk or a batch counts its own)
        self._limits: RateLimits | None = None  # MAX_RATE / KEY_RATE; None: no limit (read unlocked per take)
        self._chunk_cap = NO_CAP  # most messages per chunk the limits allow
        self._waits = {PAID_RATE: WaitTime(), PAID_KEY: WaitTime()}  # throttled messages by what they wait for
        self._key_parked: dict[Work, None] = {}  # the Works waiting for their keys' tokens (an ordered set)
        # Batches: the scheduler that forms them, and taken Works to run again before anything new
        self._batcher = self._scheduler if isinstance(self._scheduler, BatchScheduler) else None
        self._rework: deque[Work] = deque()
        self._rework_messages = 0
        # A split batch of an ordered mode runs its pieces one after the other: those not started yet (with
        # the error that sent them there, None for a fresh run) wait here, per batch, in offset order.
        self._chains: dict[Work, deque[tuple[Work, BaseException | None]]] = {}
        if self._batcher is not None:
            self._take = self._take_batch
        self.retried = 0  # retries scheduled (a message failing 3 times with 3 attempts counts 2)
        self._hook = failure_hook  # on_error: told of each failure that will be retried (the ledger: the rest)
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
        """Queue fetched Works (cut to this dispatcher's chunk size; batches form in their scheduler) and
        start workers for them."""
        with self._lock:
            now = self._clock()
            if self._batcher is not None:
                units = list(items)
                for work in units:
                    work.put_at = now
                self._batcher.put(units)
                self._batcher.promote(now)
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
            if self._batcher is None and self.chunk_size > 1:
                wanted = min(wanted, len(units))  # a worker per chunk at most
            starts = self._permits.acquire(wanted)
        self._runner.spawn(starts)

    @property
    def unit(self) -> int:
        """Messages a worker takes at a time at most: the batch size for a batch handler, else 1."""
        return self._batcher.limit if self._batcher is not None else 1

    @property
    def chunk_size(self) -> int:
        """Messages per Work put() cuts now: 1 unless chunks are on and the handler is fast."""
        per = self._per_message
        if not self._chunks or per is None or per >= FAST_HANDLER:
            return 1
        return max(1, min(int(CHUNK_TARGET / max(per, 1e-7)), self._chunk_cap))

    def _wanted_now(self) -> int:
        """Caller holds the lock. Workers to start for what may be taken now: a worker per ready batch, or
        per :meth:`_wanted` for messages."""
        if self._batcher is not None:
            return len(self._rework) + math.ceil(self._batcher.ready / self._batcher.limit)
        return self._wanted(self._scheduler.ready)

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
        if not self._delayed and not self._batch_due():
            self._unstall()
            return  # the common case, checked without the lock
        with self._lock:
            now = self._clock()
            self._promote_due(now)
            if self._batcher is not None:
                self._batcher.promote(now)
            # also covers retries a busy worker promoted: it took no permits for them
            starts = self._permits.acquire(self._wanted_now() if self._batcher is not None else self.ready)
        self._runner.spawn(starts)

    def _batch_due(self) -> bool:
        """A batch waiting to fill has waited BATCH_WAIT (a hint, read without the lock)."""
        batcher = self._batcher
        if batcher is None:
            return False
        due = batcher.next_due()
        return due is not None and due <= self._clock()

    def _unstall(self) -> None:
        """Start every free worker when Works wait and none was taken for STALL_SECONDS, or when a
        worker handed messages back (a chunk cut short)."""
        if not self.ready or self._permits.in_use >= self._permits.limit:
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
            starts = self._permits.acquire(self._wanted_now() if self._batcher is not None else self.ready)
        self._takes_at = now
        self._runner.spawn(starts)

    def limit_rates(self, max_rate: float, key_rate: float, burst: float) -> None:
        """Set MAX_RATE and KEY_RATE (0: off) and RATE_BURST. The throttled Works give their tokens back
        and go back in front of the scheduler, to pay again under the new limits."""
        with self._lock:
            now = self._clock()
            old = self._limits
            if old is not None and (old.max_rate, old.key_rate, old.burst) == (max_rate, key_rate, burst):
                return
            waiting = self._delayed.remove_if(_throttled)  # earliest due first: the order they paid in
            for work in waiting:
                self._unpark(work, now)
                if old is not None:
                    old.refund(work)
                work.paid = 0
            if not (max_rate or key_rate):
                self._limits = None
            elif old is None:
                self._limits = RateLimits(max_rate, key_rate, burst, now)
            else:
                self._limits = old.retuned(max_rate, key_rate, burst, now)
            self._chunk_cap = NO_CAP if self._limits is None else self._limits.chunk_cap
            if waiting:
                self._delayed_messages -= sum(w.size for w in waiting)
                if self._batcher is not None:  # taken Works: they hold their lanes and come back through rework
                    self._rework.extendleft(reversed(waiting))
                    self._rework_messages += sum(w.size for w in waiting)
                else:
                    self._scheduler.requeue(waiting)
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
        (they were taken once). A worker taking lock-free meanwhile may still get one: it then counts as
        started, and its completion arrives (late, if the state is gone)."""
        def chosen(work: Work) -> bool:
            return states is None or work.state in states

        dropped = self._scheduler.purge(None if states is None else chosen)
        for work in dropped:
            if work.attempts or work.paid:  # a retry or throttled Work requeued and not taken again: taken once
                self._scheduler.release(work)
        taken = self._delayed.remove_if(chosen)  # retries, throttled Works (with batches: their pieces too)
        self._delayed_messages -= sum(w.size for w in taken)
        if self._waits[PAID_RATE].waiting or self._waits[PAID_KEY].waiting:
            now = self._clock()
            for work in taken:
                if work.paid:  # waited for rate tokens
                    self._unpark(work, now)
        if self._rework:
            rework = [w for w in self._rework if chosen(w)]
            self._rework = deque(w for w in self._rework if not chosen(w))
            self._rework_messages -= sum(w.size for w in rework)
            taken.extend(rework)
        for batch in [b for b in self._chains if chosen(b)]:
            taken.extend(piece for piece, _ in self._chains.pop(batch))
        for work in taken:
            self._untake(work)
        dropped.extend(taken)
        if dropped:
            self._changed.notify_all()  # a wait_backlog_at_most may now be satisfied
        return dropped

    def _untake(self, work: Work) -> None:
        """Caller holds the lock. A taken Work that will not run again here: whatever it holds is let go."""
        batch = work.batch
        if batch is None:
            self._scheduler.release(work)
            return
        batch.left -= 1
        if batch.left == 0:
            self._scheduler.release(batch)

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
            if len(self._scheduler) + self._rework_messages <= mark:
                return True
            self._drain_mark = mark
            self._changed.wait(timeout)
            self._drain_mark = -1
            return len(self._scheduler) + self._rework_messages <= mark

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
            starts = self._permits.acquire(self._wanted_now() if self._batcher is not None else self.ready)
        self._runner.spawn(starts)

    def retune_batches(self, size: int, wait: float) -> None:
        """BATCH_SIZE and BATCH_WAIT changed live (batch mode only): from the next batch on."""
        if self._batcher is not None:
            with self._lock:
                self._batcher.retune(size, wait)

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
        """Messages waiting for a worker (ready or blocked), including those waiting for a retry or rate tokens."""
        return len(self._scheduler) + self._delayed_messages + self._rework_messages

    @property
    def ready(self) -> int:
        """Waiting messages a worker could start now (a hint: read without the lock)."""
        return self._scheduler.ready + self._rework_messages

    @property
    def blocked(self) -> int:
        """Waiting messages held back behind a running one of their key or partition (a hint)."""
        return self._scheduler.blocked

    @property
    def delayed(self) -> int:
        """Messages waiting for a time (holding no thread): failed ones for their backoff to pass, throttled
        ones for their rate tokens."""
        return self._delayed_messages

    def due_in(self) -> float | None:
        """Seconds until the next delayed message or waiting batch is due (None: none waits): the poll thread
        wakes for it. A hint read without the lock."""
        due = self._delayed.next_due()
        batcher = self._batcher
        if batcher is not None:
            batch_due = batcher.next_due()
            if batch_due is not None and (due is None or batch_due < due):
                due = batch_due
        return None if due is None else due - self._clock()

    @property
    def limits(self) -> tuple[float, float, float]:
        """(MAX_RATE, KEY_RATE, RATE_BURST) in effect; 0 for a limit that is off."""
        limits = self._limits
        return (0.0, 0.0, 0.0) if limits is None else (limits.max_rate, limits.key_rate, limits.burst)

    @property
    def throttled(self) -> int:
        """Messages waiting for rate tokens now (part of ``delayed``; a hint)."""
        return self._waits[PAID_RATE].waiting + self._waits[PAID_KEY].waiting

    def key_waiting(self) -> dict[Partition, int]:
        """Per partition, the messages waiting for their keys' KEY_RATE tokens, and those waiting behind
        them in their key's or partition's lane (an ordered mode); empty without any."""
        if not self._key_parked:
            return {}  # the common case, read without the lock
        counts: dict[Partition, int] = {}
        with self._lock:
            behind = self._scheduler.behind
            for work in self._key_parked:
                tp = work.state.tp
                counts[tp] = counts.get(tp, 0) + work.size + behind(work)
        return counts

    @property
    def rate_parked(self) -> int:
        """Messages in the delay queue that wait for MAX_RATE tokens (a hint)."""
        return self._waits[PAID_RATE].waiting

    @property
    def key_parked(self) -> int:
        """Messages in the delay queue that wait for their keys' tokens (a hint)."""
        return self._waits[PAID_KEY].waiting

    def throttled_seconds(self) -> tuple[float, float]:
        """Seconds so far during which at least one message waited for MAX_RATE tokens, and for KEY_RATE ones."""
        with self._lock:
            now = self._clock()
            return self._waits[PAID_RATE].seconds(now), self._waits[PAID_KEY].seconds(now)

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

    def _take_batch(self) -> Work:
        """Batch mode: a taken Work to run again first (a retry, a piece), else the next ready batch."""
        with self._lock:
            if self._rework:
                work = self._rework.popleft()
                self._rework_messages -= work.size
                return work
            return self._scheduler.take()

    def _locked_release(self, work: Work) -> None:
        with self._lock:
            self._scheduler.release(work)

    def _promote_due(self, now: float) -> int:
        """Caller holds the lock. Due retries and throttled Works go back to the scheduler, before anything
        fetched since (a throttled one starts without paying again)."""
        due = self._delayed.pop_due(now)
        if due:
            waits = self._waits
            if waits[PAID_RATE].waiting or waits[PAID_KEY].waiting:
                for work in due:
                    if work.paid:
                        self._unpark(work, now)
            self._delayed_messages -= sum(w.size for w in due)
            if self._batcher is not None:  # batches and their pieces hold their lanes: they come back here
                self._rework.extend(due)
                self._rework_messages += sum(w.size for w in due)
            else:
                self._scheduler.requeue(due)
        return len(due)

    def _admit(self, work: Work) -> bool:
        """Pay ``work``'s rate tokens: True when it may start now; else it waits in the delay queue, due at
        its start (or, of an assignment being given up, completes dropped: it never runs)."""
        with self._lock:
            limits = self._limits
            if limits is None:
                return True  # turned off since the unlocked look
            now = self._clock()
            start = limits.admit(work, now)
            if start <= now:
                return True
            if work.state.closing or not work.state.alive:
                work.paid = 0
                work.failed = work.dropped = True
            else:
                self._delayed.push(start, work)  # not released: an ordered scheduler keeps its lane busy
                reason = cause(work)
                self._waits[reason].add(now, work.size)
                self._delayed_messages += work.size
                if reason == PAID_KEY:
                    self._key_parked[work] = None
                return False
        if work.batch is None:
            self._release(work)
            self._done(work)
        else:
            self._piece_settled(work)
        return False

    def _unpark(self, work: Work, now: float) -> None:
        """Caller holds the lock. A throttled Work left the delay queue (due, purged or re-planned)."""
        reason = cause(work)
        self._waits[reason].remove(now, work.size)
        if reason == PAID_KEY:
            self._key_parked.pop(work, None)

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
        batcher = self._batcher
        holding = True
        try:
            while True:
                delayed = self._delayed
                if delayed:  # a retry may be due: checked without the lock, promoted under it
                    due = delayed.next_due()
                    if due is not None and due <= self._clock():
                        with self._lock:
                            self._promote_due(self._clock())
                if batcher is not None and self._batch_due():  # a batch waited long enough to fill
                    with self._lock:
                        batcher.promote(self._clock())
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
                if self._limits is not None and not self._admit(work):
                    continue  # it waits for its rate tokens without this worker
                outcome = yield work
                if outcome is None:  # done for good: whatever it blocked may run
                    if work.batch is None:
                        release(work)
                        done(work)
                    else:
                        self._piece_settled(work)
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
        permits = self._permits
        if self.ready and permits.in_use <= permits.limit:
            return False
        with self._lock:
            if self.ready and permits.in_use <= permits.limit:
                return False  # a put() came in between: its acquire saw this permit still held
            permits.release()
            self._changed.notify_all()
            return True

    def _settle_partial(self, work: Work, outcome: Partial) -> None:
        """A chunk came back failed in part or cut short, or a batch named its failed messages: complete what
        succeeded, settle each failed message alone, and put the rest back as single messages."""
        if self._batcher is not None:
            self._split_batch(work, outcome)
            return
        if outcome.handled < work.size:  # first, so that the free workers can start on it at once
            rest = work.part(outcome.handled, work.size).split(1)
            with self._lock:
                if work.state.closing or not work.state.alive:  # given up: never run, never committed
                    for piece in rest:
                        piece.failed = piece.dropped = True
                        self._done(piece)
                else:
                    if self._limits is not None:
                        for piece in rest:
                            piece.paid = PAID_ALL  # the chunk paid for them: they start without paying again
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
        work.paid = 0  # a retry is another call: it pays its rate tokens again
        work.error = describe_error(error)
        hook = self._hook
        if hook is not None:  # kept for on_error's last report only: an exception holds its traceback's frames
            work.exception = error
        what = _where(work)
        with self._lock:
            # ``closing`` is set under this lock (retire): a retry either lands in the delay queue before
            # the purge that follows, or is never scheduled.
            live = work.state.alive and not work.state.closing
            now = self._clock()
            delay = retry.next_delay(work, now) if live and _retriable(error) else None
            again = delay is not None
            if delay is not None:
                if hook is not None:  # before the retry can run: a message's reports stay in order
                    hook.report(work, RETRY)
                # not released: an ordered scheduler keeps its key blocked meanwhile
                self._delayed.push(now + delay, work)
                self._delayed_messages += work.size
                self.retried += 1
        if again:
            logger.warning("handler failed for %s (attempt %d of %d): %s; retrying in %.2fs", what, work.attempts,
                           retry.max_attempts, work.error, delay, exc_info=_traceback(error))
            return
        if live and work.size > 1 and self._batcher is not None:
            # A batch failed its last attempt: each message runs alone now, so that a poison message reaches
            # ON_FAILURE alone and the others complete.
            logger.warning("handler failed for %s (attempt %d of %d): %s; each message is tried alone now", what,
                           work.attempts, retry.max_attempts, work.error, exc_info=_traceback(error))
            if hook is not None:
                hook.report(work, RETRY)
            self._split_batch(work, Partial(work.size, [(i, error) for i in range(work.size)]), fresh=True)
            return
        work.failed = True
        # A Work of an assignment being given up is not this consumer's failure: the next owner runs it; nor
        # one the policy declined with attempts left (share mode: its caller says what becomes of it).
        final = live and (not retry.should_retry(work.attempts) or not _retriable(error))
        if live and not _retriable(error) and retry.should_retry(work.attempts):  # e.g. it does not deserialize
            logger.error("handler failed for %s: %s (not retried: another attempt fails the same way)", what,
                         work.error, exc_info=_traceback(error))
        else:
            logger.log(
                logging.ERROR if final else logging.DEBUG, "handler failed for %s (attempt %d of %d): %s",
                what, work.attempts, retry.max_attempts, work.error, exc_info=_traceback(error),
            )
        if work.batch is None:
            self._release(work)
            self._done(work)
        else:
            self._piece_settled(work)

    def _split_batch(self, batch: Work, outcome: Partial, fresh: bool = False) -> None:
        """Settle a batch in pieces: what succeeded completes at once, each failed message settles alone --
        a retry of its own (``fresh``: from its first attempt, queued to run now), then ON_FAILURE. The batch
        keeps its lanes until its last piece settled (:meth:`_piece_settled`)."""
        if batch.batch is not None:  # already a piece (a batch of one naming itself): it failed
            self.settle_failure(batch, outcome.failures[0][1])
            return
        # What succeeded is one piece, done at once (with the batch's output records: none of it is done
        # before they are written); each failed message is a piece of its own.
        failed = dict(outcome.failures)
        done = [i for i in range(batch.size) if i not in failed]
        pieces: list[tuple[Work, BaseException | None]] = []
        if done:
            rest = batch.part(done[0], done[0] + 1) if len(done) == 1 else Work.merged(
                [batch.part(i, i + 1) for i in done])
            rest.outputs = batch.outputs
            pieces.append((rest, None))
        for index in sorted(failed):
            piece = batch.part(index, index + 1)
            piece.outputs = None  # a failed call's records are never written
            pieces.append((piece, failed[index]))
        for piece, error in pieces:
            piece.batch = batch
            if fresh and self._hook is not None:
                piece.exception = error  # failed with the batch: on_error hears of it if it never runs alone
        # Ordered modes: the batch's lanes allow one call at a time, so its pieces to run go one by one.
        ordered = self._batcher is not None and self._batcher.ordering != "unordered"
        with self._lock:
            batch.left = len(pieces)
            if fresh:
                again = [piece for piece, _ in pieces]
                if ordered:
                    self._chains[batch] = deque((piece, None) for piece in again[1:])
                    again = again[:1]
                self._rework.extend(again)
                self._rework_messages += sum(piece.size for piece in again)
                self._wake = True  # the poll thread starts free workers for them
                return
            if ordered:
                failed = [(piece, error) for piece, error in pieces if error is not None]
                self._chains[batch] = deque(failed[1:])
                pieces = [(piece, error) for piece, error in pieces if error is None] + failed[:1]
        for piece, error in pieces:
            if error is None:
                self._piece_settled(piece)
            else:
                self.settle_failure(piece, error)

    def _piece_settled(self, piece: Work) -> None:
        """A piece of a split batch is done for good (succeeded, or failed its last attempt): the next piece of
        an ordered batch gets its turn, and once every piece is done the batch lets its lanes go."""
        self._done(piece)
        batch = piece.batch
        assert batch is not None
        following: tuple[Work, BaseException | None] | None = None
        with self._lock:
            batch.left -= 1
            if batch.left == 0:
                self._chains.pop(batch, None)
                self._scheduler.release(batch)
                return
            chain = self._chains.get(batch)
            if chain:  # an ordered batch's next piece: its turn now
                following = chain.popleft()
                if following[1] is None:
                    self._rework.append(following[0])
                    self._rework_messages += following[0].size
                    self._wake = True
                    following = None
        if following is not None:
            self.settle_failure(*following)  # a named failure: its retry (or ON_FAILURE) starts now


def _where(work: Work) -> str:
    """``topic[partition]@offset`` of a message, or of a batch's first and last message, for log lines."""
    msg = work.message
    if work.size == 1:
        return f"{msg.topic()}[{msg.partition()}]@{work.offset}"
    return f"a batch of {work.size} of {msg.topic()}[{msg.partition()}]@{work.offset}..{work.offsets[-1]}"


def _retriable(error: BaseException) -> bool:
    """False for a failure that another attempt cannot change: a key or value that does not deserialize."""
    return not isinstance(error, DeserializationError) or error.retriable


def _throttled(work: Work) -> bool:
    """A delayed Work that waits for rate tokens (a retry waiting out its backoff has paid nothing)."""
    return work.paid != 0


def _traceback(error: BaseException) -> tuple[type[BaseException], BaseException, object] | None:
    """The handler's traceback for a DEBUG logger (``exc_info`` outside an ``except`` must be explicit)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return None
    return type(error), error, error.__traceback__
