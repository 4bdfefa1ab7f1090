"""Batches: the dispatcher's side of a batch handler -- batches to form, to run again, and to settle in pieces.

The batch scheduler (:mod:`mtc75.core.batching`) forms the batches. A batch that raised is retried whole;
after its last attempt it is split and each message runs alone, with attempts of its own; a batch whose
handler named the failed messages (``BatchError``) completes the rest at once and retries those alone.
Taken Works that run again (a batch's retry, its pieces) wait in the *rework* queue, which workers serve
before the scheduler. The batch keeps its lanes (ORDERING) until its last piece settled, then it is released
once; in an ordered mode its pieces run one after the other (a *chain*, in offset order).

Thread contract: the dispatcher's lock guards everything here. :meth:`Batches.take`, :meth:`Batches.split`,
:meth:`Batches.settled` and :meth:`Batches.retune` take it (workers call the first three, the poll thread the
last); the other methods are called with it held. ``messages``, ``startable`` and :meth:`Batches.due` may be
read without it, as hints.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable

from mtc75.core.batching import BatchScheduler
from mtc75.core.work import Work
from mtc75.runtime.invoker import Partial
from mtc75.runtime.pacing import Pacing

# A piece of a split batch and the error that sent it there (None: it succeeded, or runs afresh).
Piece = tuple[Work, BaseException | None]


class Batches:
    """A batch handler's batches between the scheduler and the completion queue (see the module notes)."""

    def __init__(
        self, scheduler: BatchScheduler, lock: threading.Lock, clock: Callable[[], float],
        done: Callable[[Work], None], pacing: Pacing, keep_errors: bool,
    ) -> None:
        self.scheduler = scheduler
        self._lock, self._clock, self._done, self._pacing = lock, clock, done, pacing
        self._keep_errors = keep_errors  # on_error is set: a piece keeps the exception it failed with
        # settles a piece that failed (a retry of its own, or its last failure); set by the dispatcher
        self.fail: Callable[[Work, BaseException], None] = _unwired
        self._rework: deque[Work] = deque()
        self.messages = 0  # in the rework queue
        # A split batch of an ordered mode runs its pieces one after the other: those not started yet wait
        # here, per batch, in offset order.
        self._chains: dict[Work, deque[Piece]] = {}

    # -- forming (caller holds the lock) ---------------------------------------------------------------

    def put(self, units: list[Work], now: float) -> None:
        for work in units:
            work.put_at = now
        self.scheduler.put(units)
        self.scheduler.promote(now)

    def promote(self, now: float) -> None:
        self.scheduler.promote(now)

    def due(self) -> bool:
        """A batch waiting to fill has waited BATCH_WAIT (a hint)."""
        due = self.scheduler.next_due()
        return due is not None and due <= self._clock()

    @property
    def startable(self) -> int:
        """Workers to start for what may be taken now: one per Work to run again and per ready batch."""
        return len(self._rework) + math.ceil(self.scheduler.ready / self.scheduler.limit)

    @property
    def unit(self) -> int:
        """BATCH_SIZE: messages a worker takes at a time at most."""
        return self.scheduler.limit

    def retune(self, size: int, wait: float) -> None:
        """BATCH_SIZE and BATCH_WAIT changed live: from the next batch on."""
        with self._lock:
            self.scheduler.retune(size, wait)

    # -- taking and running again ----------------------------------------------------------------------

    def take(self) -> Work:
        """A taken Work to run again first (a retry, a piece), else the next ready batch (IndexError: none)."""
        with self._lock:
            if self._rework:
                work = self._rework.popleft()
                self.messages -= work.size
                return work
            return self.scheduler.take()

    def put_back(self, works: list[Work], front: bool = False) -> None:
        """Caller holds the lock. Taken Works (batches and their pieces hold their lanes) to run again, before
        anything not taken yet; ``front``: before the other Works to run again too."""
        if front:
            self._rework.extendleft(reversed(works))
        else:
            self._rework.extend(works)
        self.messages += sum(w.size for w in works)

    def purge(self, chosen: Callable[[Work], bool]) -> list[Work]:
        """Caller holds the lock. Remove and return the Works to run again that ``chosen`` selects, with the
        pieces of a chosen batch's chain; each is still taken (:meth:`untake`)."""
        taken: list[Work] = []
        if self._rework:
            taken = [w for w in self._rework if chosen(w)]
            self._rework = deque(w for w in self._rework if not chosen(w))
            self.messages -= sum(w.size for w in taken)
        for batch in [b for b in self._chains if chosen(b)]:
            taken.extend(piece for piece, _ in self._chains.pop(batch))
        return taken

    def untake(self, work: Work) -> None:
        """Caller holds the lock. A taken Work that will not run again here: whatever it holds is let go."""
        batch = work.batch
        if batch is None:
            self.scheduler.release(work)
            return
        batch.left -= 1
        if batch.left == 0:
            self.scheduler.release(batch)

    # -- settling in pieces ----------------------------------------------------------------------------

    def split(self, batch: Work, outcome: Partial, fresh: bool = False) -> None:
        """Settle a batch in pieces: what succeeded completes at once, each failed message settles alone -- a
        retry of its own (``fresh``: from its first attempt, queued to run now), then ON_FAILURE. The batch
        keeps its lanes until its last piece settled (:meth:`settled`)."""
        if batch.batch is not None:  # already a piece (a batch of one naming itself): it failed
            self.fail(batch, outcome.failures[0][1])
            return
        # What succeeded is one piece, done at once (with the batch's output records: none of it is done
        # before they are written); each failed message is a piece of its own.
        failed = dict(outcome.failures)
        done = [i for i in range(batch.size) if i not in failed]
        pieces: list[Piece] = []
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
            if fresh and self._keep_errors:
                piece.exception = error  # failed with the batch: on_error hears of it if it never runs alone
        # Ordered modes: the batch's lanes allow one call at a time, so its pieces to run go one by one.
        ordered = self.scheduler.ordering != "unordered"
        with self._lock:
            batch.left = len(pieces)
            if fresh:
                again = [piece for piece, _ in pieces]
                if ordered:
                    self._chains[batch] = deque((piece, None) for piece in again[1:])
                    again = again[:1]
                self.put_back(again)
                self._pacing.woken = True  # the poll thread starts free workers for them
                return
            if ordered:
                failed_pieces = [(piece, error) for piece, error in pieces if error is not None]
                self._chains[batch] = deque(failed_pieces[1:])
                pieces = [(piece, error) for piece, error in pieces if error is None] + failed_pieces[:1]
        for piece, error in pieces:
            if error is None:
                self.settled(piece)
            else:
                self.fail(piece, error)

    def settled(self, piece: Work) -> None:
        """A piece of a split batch is done for good (succeeded, or failed its last attempt): the next piece of
        an ordered batch gets its turn, and once every piece is done the batch lets its lanes go."""
        self._done(piece)
        batch = piece.batch
        assert batch is not None
        following: Piece | None = None
        with self._lock:
            batch.left -= 1
            if batch.left == 0:
                self._chains.pop(batch, None)
                self.scheduler.release(batch)
                return
            chain = self._chains.get(batch)
            if chain:  # an ordered batch's next piece: its turn now
                following = chain.popleft()
                if following[1] is None:
                    self.put_back([following[0]])
                    self._pacing.woken = True
                    following = None
        if following is not None:
            self.fail(*following)  # a named failure: its retry (or ON_FAILURE) starts now


def _unwired(work: Work, error: BaseException) -> None:
    raise RuntimeError("Batches.fail is not wired")
