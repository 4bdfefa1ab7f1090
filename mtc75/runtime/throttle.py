"""Throttle: MAX_RATE and KEY_RATE on the workers' side -- a taken Work pays its tokens before it runs.

A worker that takes a Work pays its tokens (:mod:`mtc75.core.ratelimit`: key first, then the consumer's, one
per message); when the buckets put its start in the future the Work waits in the dispatcher's delay queue,
due then and marked as paid, and the worker takes the next one. So a throttled message holds no thread,
counts in the backlog (the gate pauses fetching once such messages fill it), and in an ordered mode keeps its
lane busy, like a retry waiting out its backoff. A change of the limits (:meth:`Throttle.retune`) gives the
waiting messages' tokens back, to pay again at the new rates. Chunks hold at most ``chunk_cap`` messages.

Thread contract: the dispatcher's lock guards everything here. :meth:`Throttle.admit` and the reads that say
so take it; the other methods are called with it held. ``rates`` is read without it once per taken Work
(None: no limit, the hot path's one test), the counts as hints.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from mtc75.core.offsets import Partition
from mtc75.core.ratelimit import NO_CAP, PAID_KEY, PAID_RATE, RateLimits, WaitTime, cause
from mtc75.core.retry import DelayedWorks
from mtc75.core.scheduler import Scheduler
from mtc75.core.work import Work


class Throttle:
    """The rate limits in effect and the Works waiting for their tokens (see the module notes)."""

    def __init__(
        self, lock: threading.Lock, clock: Callable[[], float], scheduler: Scheduler, delayed: DelayedWorks,
        finish: Callable[[Work], None],
    ) -> None:
        self.rates: RateLimits | None = None  # None: no limit
        self.chunk_cap = NO_CAP  # most messages per chunk the limits allow
        self._lock, self._clock, self._scheduler, self._delayed = lock, clock, scheduler, delayed
        self._finish = finish  # a Work done for good (here: dropped, never run)
        self._waits = {PAID_RATE: WaitTime(), PAID_KEY: WaitTime()}  # throttled messages by what they wait for
        self._key_parked: dict[Work, None] = {}  # the Works waiting for their keys' tokens (an ordered set)

    def admit(self, work: Work) -> bool:
        """Pay ``work``'s tokens: True when it may start now; else it waits in the delay queue, due at its
        start (or, of an assignment being given up, is finished dropped: it never runs)."""
        with self._lock:
            rates = self.rates
            if rates is None:
                return True  # turned off since the unlocked look
            now = self._clock()
            start = rates.admit(work, now)
            if start <= now:
                return True
            if work.state.closing or not work.state.alive:
                work.paid = 0
                work.failed = work.dropped = True
            else:
                self._delayed.push(start, work)  # not released: an ordered scheduler keeps its lane busy
                reason = cause(work)
                self._waits[reason].add(now, work.size)
                if reason == PAID_KEY:
                    self._key_parked[work] = None
                return False
        self._finish(work)
        return False

    def unpark(self, works: Iterable[Work], now: float) -> None:
        """Caller holds the lock. These Works left the delay queue (due, purged or re-planned): those that
        waited for tokens wait no more."""
        waits = self._waits
        if not (waits[PAID_RATE].waiting or waits[PAID_KEY].waiting):
            return
        for work in works:
            if work.paid:  # a retry waiting out its backoff has paid nothing
                reason = cause(work)
                waits[reason].remove(now, work.size)
                if reason == PAID_KEY:
                    self._key_parked.pop(work, None)

    def retune(self, max_rate: float, key_rate: float, burst: float) -> list[Work] | None:
        """Caller holds the lock. New limits (0: off): the Works waiting for tokens leave the delay queue with
        their tokens given back, and are returned to run again. None: the limits did not change."""
        now = self._clock()
        old = self.rates
        if old is not None and (old.max_rate, old.key_rate, old.burst) == (max_rate, key_rate, burst):
            return None
        waiting = self._delayed.remove_if(_throttled)  # earliest due first: the order they paid in
        self.unpark(waiting, now)
        for work in waiting:
            if old is not None:
                old.refund(work)
            work.paid = 0
        if not (max_rate or key_rate):
            self.rates = None
        elif old is None:
            self.rates = RateLimits(max_rate, key_rate, burst, now)
        else:
            self.rates = old.retuned(max_rate, key_rate, burst, now)
        self.chunk_cap = NO_CAP if self.rates is None else self.rates.chunk_cap
        return waiting

    @property
    def limits(self) -> tuple[float, float, float]:
        """(MAX_RATE, KEY_RATE, RATE_BURST) in effect; 0 for a limit that is off."""
        rates = self.rates
        return (0.0, 0.0, 0.0) if rates is None else (rates.max_rate, rates.key_rate, rates.burst)

    @property
    def throttled(self) -> int:
        """Messages waiting for rate tokens now (part of the dispatcher's ``delayed``; a hint)."""
        return self._waits[PAID_RATE].waiting + self._waits[PAID_KEY].waiting

    @property
    def rate_parked(self) -> int:
        """Messages waiting for MAX_RATE tokens (a hint)."""
        return self._waits[PAID_RATE].waiting

    @property
    def key_parked(self) -> int:
        """Messages waiting for their keys' tokens (a hint)."""
        return self._waits[PAID_KEY].waiting

    def key_waiting(self) -> dict[Partition, int]:
        """Per partition, the messages waiting for their keys' KEY_RATE tokens, and those waiting behind them
        in their key's or partition's lane (an ordered mode); empty without any. Takes the lock."""
        if not self._key_parked:
            return {}  # the common case, read without the lock
        counts: dict[Partition, int] = {}
        with self._lock:
            behind = self._scheduler.behind
            for work in self._key_parked:
                tp = work.state.tp
                counts[tp] = counts.get(tp, 0) + work.size + behind(work)
        return counts

    def seconds(self) -> tuple[float, float]:
        """Seconds so far during which at least one message waited for MAX_RATE tokens, and for KEY_RATE
        ones. Takes the lock."""
        with self._lock:
            now = self._clock()
            return self._waits[PAID_RATE].seconds(now), self._waits[PAID_KEY].seconds(now)


def _throttled(work: Work) -> bool:
    """A delayed Work that waits for rate tokens (a retry waiting out its backoff has paid nothing)."""
    return work.paid != 0
