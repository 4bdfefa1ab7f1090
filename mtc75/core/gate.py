"""When to pause and resume the assigned partitions: pure policy, no Kafka, no clock of its own.

Thread contract: poll thread only (no lock): the engine asks it once per loop turn and acts itself.

Pausing is how a saturated consumer keeps calling ``poll()`` (heartbeats, rebalances,
``max.poll.interval.ms``) without taking more messages than it can hold. It is not free: librdkafka
drops a paused partition's prefetched messages and fetches them again on resume. So the gate pauses
only when the backlog reached its high watermark *and* the workers cannot take from it: every thread
busy, or the free threads with nothing they may start (an ordered mode: the rest waits behind its key or
partition), or retries alone filling it (everything waits out a backoff). It resumes when the backlog
has drained to its low watermark; each ``pause_interval`` that passes with the backlog still above it
extends the pause by another interval.

The watermarks follow the measured throughput: the high one holds enough work to keep every thread
busy for one pause interval (so a pause lasts about ``pause_interval``), the low one enough to bridge
the refetch after a resume. The pause exists to keep the consumer alive, not to idle the pool. A
``reserve`` raises the low one (and the high one with it; at most to half the backlog bound): a
rate-limited consumer keeps that many messages at a resume, because a token that finds the backlog empty
is lost for good.

Threads: the poll thread only (no lock); the throughput comes from the consumer's one
:class:`~mtc75.core.stats.Throughput`, which the status snapshot shows too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mtc75.core.stats import Throughput

REFETCH_SECONDS = 0.05  # work kept in the backlog at resume, to cover the refetch round-trip


@dataclass(frozen=True)
class Load:
    """The pool as the gate sees it: permits held and allowed, and the waiting messages."""

    active: int  # permits held (handlers running)
    limit: int  # MAX_THREAD_COUNT now
    backlog: int  # messages waiting: ready, blocked behind a key or partition, or waiting for a retry
    ready: int  # waiting messages that a free worker could start now
    delayed: int  # waiting messages that wait for a time: retries waiting out a backoff, rate-limited ones
    unit: int = 1  # messages a worker takes at a time: the batch size for a batch handler
    retrying: int = 0  # of ``delayed``: the retries (they hold no thread, nor the room others need to run)


class Verdict(Enum):
    RUN = "run"  # keep fetching
    PAUSE = "pause"  # pause now: the backlog cannot drain (messages waiting for rate tokens fill it, or MAX_BACKLOG)
    PAUSE_UNLESS_DRAINED = "pause unless drained"  # pause unless the pool drains to the low watermark now


class PauseGate:
    """Decides pause/resume from the thread count, the backlog and the time; the caller acts."""

    def __init__(self, pause_interval: float, max_backlog: int) -> None:
        if pause_interval <= 0:
            raise ValueError(f"pause_interval must be > 0, got {pause_interval}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        self.pause_interval = pause_interval
        self.max_backlog = max_backlog
        self.paused = False
        self.pauses = 0  # pauses started
        self.extensions = 0  # intervals a pause was prolonged because still saturated
        self.paused_seconds = 0.0  # total over finished pauses
        self._paused_at = 0.0
        self._recheck_at = 0.0
        self.throughput = Throughput()  # the consumer's one estimator: the status snapshot shows its rate
        self.reserve = 0  # messages the low watermark keeps at least (MAX_RATE's refetch margin)

    # -- throughput ---------------------------------------------------------------------------------

    def observe(self, now: float, completed_total: int) -> None:
        """Feed the running count of finished messages; cheap enough to call every loop."""
        self.throughput.observe(now, completed_total)

    @property
    def rate(self) -> float:
        return self.throughput.rate

    def watermarks(self, limit: int, unit: int = 1) -> tuple[int, int]:
        """(low, high) backlog sizes for a pool of ``limit`` threads taking ``unit`` messages a call (a batch).

        With batches the bound is at least two batches (a batch must fit to fill), the low watermark at least
        one batch below the high one, so that a resume leaves room to fill a batch.
        """
        rate = self.throughput.rate
        if unit == 1:
            low = max(limit, int(rate * REFETCH_SECONDS), min(self.reserve, self.max_backlog // 2))
            high = min(max(low + limit, low + int(rate * self.pause_interval)), self.max_backlog)
            return min(low, high), high
        cap = max(self.max_backlog, 2 * unit)
        low = max(min(limit * unit, cap // 2), int(rate * REFETCH_SECONDS), min(self.reserve, cap // 2))
        high = min(max(low + unit, low + int(rate * self.pause_interval)), cap)
        return max(0, min(low, high - unit)), high

    # -- decisions ----------------------------------------------------------------------------------

    def verdict(self, load: Load) -> Verdict:
        """Whether to pause (see the module notes). A fast pool usually catches up within a grace period,
        and pausing it would only throw away prefetched messages: PAUSE_UNLESS_DRAINED says so."""
        if self.paused:
            return Verdict.RUN
        high = self.watermarks(load.limit, load.unit)[1]
        # Retries waiting out a backoff do not count against the high watermark: they hold no thread, so the
        # pool must get other work meanwhile; MAX_BACKLOG bounds them with the rest.
        if load.backlog - load.retrying < high and load.backlog < self.max_backlog:
            return Verdict.RUN
        if load.delayed - load.retrying >= high or load.delayed >= self.max_backlog:
            return Verdict.PAUSE
        startable = -(-load.ready // load.unit)  # batches (or messages) a free worker could take now
        if load.active >= load.limit or startable <= load.limit - load.active:
            return Verdict.PAUSE_UNLESS_DRAINED
        return Verdict.RUN

    def start_pause(self, now: float) -> None:
        self.paused = True
        self.pauses += 1
        self._paused_at = now
        self._recheck_at = now + self.pause_interval

    def should_resume(self, now: float, limit: int, backlog: int, unit: int = 1) -> bool:
        """Resume once the backlog is down to the low watermark; at each interval still above it, stay.

        The high watermark holds about one interval of work, so a pause normally lasts one interval.
        When throughput beat the estimate, the backlog reaches the low watermark sooner and the pause
        ends then: waiting out the interval would only idle threads.
        """
        if not self.paused:
            return False
        if backlog <= self.watermarks(limit, unit)[0]:
            return True
        while self._recheck_at <= now:  # an interval passed and still saturated: another interval
            self._recheck_at += self.pause_interval
            self.extensions += 1
        return False

    def end_pause(self, now: float) -> float:
        """Leave the paused state; returns how long this pause lasted."""
        lasted = now - self._paused_at if self.paused else 0.0
        self.paused = False
        self.paused_seconds += lasted
        return lasted

    def paused_for(self, now: float) -> float:
        """Seconds the current pause has lasted (0 when running)."""
        return now - self._paused_at if self.paused else 0.0

    def next_check_in(self, now: float) -> float:
        """Seconds until the next interval boundary of the current pause."""
        return max(0.0, self._recheck_at - now) if self.paused else 0.0
