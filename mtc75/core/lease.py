"""Share-group arithmetic (GROUP_TYPE="share"): how long a poll's records may be held and how many to keep.

Pure: no Kafka, no threads, no clock of its own (callers pass ``now`` and the handler time).

A share group's broker locks every record it hands a member for the group's lock duration
(``share.record.lock.duration.ms``, 30 s by default). An acknowledgement that arrives after the lock
ended is refused and the record goes to any member again, so a member holds a record only while it can
still finish it in time. One poll's records form a :class:`Lease`: their locks started during that poll,
so they end together, at the lease's ``deadline`` (counted from *before* the poll: never later than the
broker's). The rules the share engine (:mod:`mtc75.engine.share`) follows:

- **Keep what fits** (:func:`keep`): of a poll -- the broker hands out whole producer batches, far over
  ``max.poll.records`` at times -- keep what the free threads can finish before the deadline, once the
  handler's time is known; release the rest at once (another member takes it with a fresh lock). A release
  costs the record one of its deliveries, so nothing that fits is released: a member may hold a whole
  batch while another waits. A handler slower than the lock cannot finish in time whatever is kept: only
  what starts at once is kept, and nothing waits.
- **Never wait past the point of no return** (:meth:`Lease.release_at`): records not started by the
  deadline minus one handler time minus ``LOCK_MARGIN`` are released.
- **Never hold a record past its lock** (:attr:`Lease.deadline`): what still runs then is given back (its
  handler goes on; its outcome is no longer this member's).
- **Attempts count deliveries** (:func:`first_attempt`): a record delivered for the n-th time has had n - 1
  attempts (its earlier deliveries may have run elsewhere), so MAX_ATTEMPTS bounds it across members, and
  the last delivery the group allows is final: a failure then goes to ON_FAILURE, never back to the broker,
  which would archive it unseen.

:class:`HandlerTime` is the smoothed duration of a handler call, fed by the invoker as a call observer.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds an acknowledgement needs to reach the broker before the lock ends: sent at once when a lease gets
# this close (a refused acknowledgement costs a duplicate), and the point of no return keeps this far away.
LOCK_MARGIN = 1.0
SMOOTHING = 0.3  # weight of the newest call in the smoothed handler time


@dataclass(frozen=True)
class Lease:
    """The records of one poll, locked to this member from ``acquired_at`` (monotonic, before the poll)."""

    acquired_at: float
    lock_seconds: float  # the group's share.record.lock.duration.ms, in seconds

    @property
    def deadline(self) -> float:
        """When the broker's locks end at the latest: nothing of this lease may be acknowledged later."""
        return self.acquired_at + self.lock_seconds

    def in_time(self, per_call: float | None) -> bool:
        """Whether a handler call of ``per_call`` seconds can finish within the lock at all (unknown: yes)."""
        return per_call is None or per_call < self.lock_seconds - LOCK_MARGIN

    def release_at(self, per_call: float | None) -> float:
        """The point of no return: a record not started by then cannot be acknowledged in time."""
        spare = per_call if per_call is not None and self.in_time(per_call) else 0.0
        return self.deadline - LOCK_MARGIN - spare

    def retry_fits(self, due: float, per_call: float | None) -> bool:
        """Whether a retry starting at ``due`` ends before the point of no return's margin (a local retry);
        if not, the record goes back to the broker for another delivery."""
        return due <= self.release_at(per_call)


def keep(offered: int, free: int, seconds_left: float, per_call: float | None, lock_seconds: float) -> int:
    """How many of ``offered`` records to keep: what ``free`` threads finish in ``seconds_left`` (less the
    margin) at ``per_call`` seconds a call, at least what they start now; all while the handler time is
    unknown (the point of no return releases what did not start); only ``free`` for a handler slower than
    the lock. Every release costs the record a delivery, so nothing that fits is released."""
    if free <= 0:
        return 0
    if per_call is None or per_call <= 0:
        return offered
    if per_call >= lock_seconds - LOCK_MARGIN:
        return min(offered, free)  # each overruns its lock wherever it runs: start what can start, none waits
    return min(offered, max(free, int(free * max(0.0, seconds_left - LOCK_MARGIN) / per_call)))


def first_attempt(delivery_count: int | None) -> int:
    """Attempts a record has had before this delivery: one per earlier delivery (None, 0: a first one)."""
    return max(0, (delivery_count or 1) - 1)


def last_delivery(delivery_count: int | None, limit: int) -> bool:
    """The group's ``share.delivery.count.limit``-th delivery: released or expired now, the broker archives it."""
    return delivery_count is not None and delivery_count >= limit


class HandlerTime:
    """The smoothed wall time of a handler call: a call observer (:class:`mtc75.runtime.invoker.CallObserver`).

    ``call_ended`` runs on worker threads (or the event loop) and writes one float without a lock (a lost
    update is one sample); the poll thread reads :attr:`seconds`.
    """

    wants_cpu = False

    def __init__(self, smoothing: float = SMOOTHING) -> None:
        self._smoothing = smoothing
        self.seconds: float | None = None  # None until a call ended

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        old = self.seconds
        self.seconds = seconds if old is None else (1 - self._smoothing) * old + self._smoothing * seconds
