"""Pieces: a chunk or an ordered run that came back failed in part or cut short, settled message by message.

What the handler finished completes; each failed message is settled alone (a retry, or its last failure:
:mod:`mtc75.runtime.retries`); what it never reached goes back to the scheduler as single messages, to start
at once (or, of an assignment being given up, completes dropped: never run, never committed). An ordered run
(mtc75/core/ordering.py) stops at its first failure: the failed message keeps its key's lane through its
retries (:meth:`mtc75.core.ordering.LaneScheduler.handover`) while its other lanes go free; a run cut short
releases them all once its rest is back. A batch that named its failed messages is the batches' to split.

Thread contract: workers call :meth:`Pieces.settle` (their shift); scheduler calls take the dispatcher's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mtc75.core.ordering import LaneScheduler
from mtc75.core.ratelimit import PAID_ALL
from mtc75.core.scheduler import Scheduler
from mtc75.core.work import Work
from mtc75.runtime.batches import Batches
from mtc75.runtime.invoker import Invoker, Partial
from mtc75.runtime.pacing import Pacing
from mtc75.runtime.retries import Retries
from mtc75.runtime.throttle import Throttle


def ordered_runs(scheduler: Scheduler, takes_chunks: bool, invoker: Invoker) -> LaneScheduler | None:
    """The ordered scheduler that hands a fast handler's lanes out in runs, or None: runs need a runner that
    takes chunks on threads of this process, whose invoker is then told to stop a run at its first failure."""
    if not isinstance(scheduler, LaneScheduler) or not takes_chunks or invoker.processes:
        return None
    invoker.ordered = True
    return scheduler


class Pieces:
    """Splits one dispatcher's Works that did not simply succeed (see the module notes)."""

    def __init__(
        self, lock: threading.Lock, scheduler: Scheduler, lanes: LaneScheduler | None, batches: Batches | None,
        throttle: Throttle, pacing: Pacing, retries: Retries, done: Callable[[Work], None],
        release: Callable[[Work], None],
    ) -> None:
        self._lock, self._scheduler, self._lanes, self._batches = lock, scheduler, lanes, batches
        self._throttle, self._pacing, self._retries = throttle, pacing, retries
        self._done, self._release = done, release

    def settle(self, work: Work, outcome: Partial) -> None:
        """Complete what succeeded, settle each failed message alone, put the rest back as single messages."""
        if self._batches is not None:
            self._batches.split(work, outcome)
            return
        lanes = self._lanes
        if outcome.handled < work.size:  # first, so that the free workers can start on it at once
            self._put_back(work.part(outcome.handled, work.size).split(1), slow=not (lanes and outcome.failures))
        done = self._done
        start = 0
        for index, error in sorted(outcome.failures, key=lambda failure: failure[0]):
            if index > start:
                done(work.part(start, index))
            piece = work.part(index, index + 1)
            if lanes is not None:  # an ordered run stopped at this failure: its lane waits for this message
                with self._lock:
                    lanes.handover(work, piece)
            self._retries.fail(piece, error)
            start = index + 1
        if outcome.handled > start:
            done(work.part(start, outcome.handled))
        if lanes is not None and not outcome.failures:
            self._release(work)  # cut short: its lanes go on with the rest, now back in front

    def _put_back(self, rest: list[Work], slow: bool) -> None:
        """The messages the handler never reached: back in front (``slow``: the handler turned slow, so single
        messages and every free worker until it is measured again), or dropped if given up."""
        state = rest[0].state
        with self._lock:
            if state.closing or not state.alive:  # given up: never run, never committed
                for piece in rest:
                    piece.failed = piece.dropped = True
                    self._done(piece)
                return
            if self._throttle.rates is not None:
                for piece in rest:
                    piece.paid = PAID_ALL  # the chunk paid for them: they start without paying again
            self._scheduler.requeue(rest)
            if slow:
                self._pacing.forget()
