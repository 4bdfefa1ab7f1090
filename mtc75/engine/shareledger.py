"""The share ledger (GROUP_TYPE="share"): a poll's records in as Works, each acknowledged once its fate is known.

What the :class:`~mtc75.engine.ledger.Ledger` is to a consumer group, this is to a share group: the share
engine (:mod:`mtc75.engine.share`) polls a batch only once every record of the previous one is
acknowledged (the client refuses otherwise), so the ledger holds one batch at a time, under one
:class:`~mtc75.core.lease.Lease`, with one :class:`~mtc75.core.offsets.PartitionState` per partition of it
(the Works' ``state``: ``closing`` once the batch is retired, ``alive`` False once its locks ended).

- :meth:`ShareLedger.admit`: every record counts as acquired (and by its delivery count); what the free
  threads cannot run in time is released at once (:func:`mtc75.core.lease.keep`; a record on its last
  delivery is always kept, first); a redelivery of a record whose handler still runs here (its lock ended
  while it ran) waits for that handler instead of running twice.
- :meth:`ShareLedger.settle`: success -> ACCEPT (with output records: once they are written); a failure
  out of attempts -> ON_FAILURE (``skip``: ACCEPT; ``dlq``: ACCEPT once the dead letter is confirmed;
  ``stop``: held, then released at shutdown, exit 5); a failure the lock leaves no retry for -> RELEASE
  (delivered again, its attempts counted by the delivery count) or, on its last delivery, ON_FAILURE.
- :meth:`ShareLedger.retire` (at the lease's point of no return, and at shutdown): the unstarted records
  are released (a failed one on its last delivery, or one that never started on it: ON_FAILURE).
- :meth:`ShareLedger.expire` (at the lease's deadline): whatever is still held is released -- the lock
  has ended or is about to -- and a handler still running is counted (``lock_expired``); its outcome,
  when it comes, is no longer this member's (dropped as late, or taken by its waiting redelivery).

Threads: the poll thread only (no lock), like the share client whose acknowledgements it records.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import AcknowledgeType, KafkaError, KafkaException

from mtc75.core.lease import Lease, first_attempt, keep, last_delivery
from mtc75.core.offsets import PartitionState
from mtc75.core.stats import ShareCounts
from mtc75.core.work import Work
from mtc75.engine.failure import FailurePolicy, SkipPolicy
from mtc75.kafka.outputs import OutputSink
from mtc75.kafka.share import ACCEPT, RELEASE

logger = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (topic, partition, offset): one record
# with the dispatcher, with ON_FAILURE, for its twin, its output records being written
QUEUED, FAILING, WAITING, WRITING = "queued", "failing", "waiting", "writing"
NOT_STARTED = "not started within its lock on its last delivery (share.delivery.count.limit)"


def key_of(msg: Any) -> Key:
    return msg.topic(), msg.partition(), msg.offset()


def _singles(work: Work) -> list[Work]:
    """A failed Work of several records (a batch that failed as a whole) as one failed Work per record:
    ON_FAILURE and the acknowledgements go record by record."""
    pieces = [work.part(i, i + 1) for i in range(work.size)]
    for piece in pieces:
        piece.failed, piece.dropped, piece.attempts, piece.error = work.failed, work.dropped, work.attempts, work.error
    return pieces


@dataclass(eq=False)
class Held:
    """A record of the current batch not yet acknowledged."""

    message: Any
    state: PartitionState  # its partition's state in this batch
    last: bool  # its last delivery: released or expired now, the broker archives it
    phase: str = QUEUED
    work: Work | None = None  # the Work carrying it while it waits for its twin (phase WAITING)


class ShareLedger:
    """The current batch and the acknowledgement counts of one share run (see the module notes)."""

    def __init__(self, acknowledge: Callable[[Any, AcknowledgeType], None], max_attempts: int,
                 delivery_limit: int, on_error: Callable[[KafkaError], None]) -> None:
        self._acknowledge = acknowledge  # the share client's: recorded now, sent with the next poll or send()
        self._max_attempts = max_attempts
        self.delivery_limit = delivery_limit  # the group's share.delivery.count.limit
        self._on_error = on_error  # an error event among the polled records
        self.failure: FailurePolicy = SkipPolicy()  # ON_FAILURE; the engine sets it once Kafka is reached
        self.outputs: OutputSink | None = None  # where handlers' output records go (the engine sets it)
        self.lease: Lease | None = None  # the current batch's (None before the first poll)
        self.states: list[PartitionState] = []  # the current batch's, one per partition
        self.held: dict[Key, Held] = {}  # the current batch's records not yet acknowledged
        self._overdue: set[Key] = set()  # records whose lock ended while their handler ran here
        self._sent: dict[Key, PartitionState] = {}  # accepted, the broker's answer not in yet: the record's batch
        self.lost: str | None = None  # why the current batch's locks are gone (an acceptance of it was refused)
        self.unsent = 0  # acknowledgements recorded since the last poll or send
        self.processed = 0  # finished: accepted after success, skip, or a confirmed dead letter
        self.failed = 0  # failed their last attempt (ON_FAILURE applied)
        self.dropped_late = 0  # outcomes of records whose lock had ended (another delivery takes over)
        self.acquired = self.accepted = self.released = self.lock_expired = self.rejoined = self.refused = 0
        self.deliveries: Counter[int] = Counter()

    @property
    def done(self) -> bool:
        """Every record of the current batch acknowledged: the next poll may go."""
        return not self.held

    def counts(self) -> ShareCounts:
        return ShareCounts(self.acquired, self.accepted, self.released, self.lock_expired, self.rejoined,
                           self.refused, dict(self.deliveries))

    # -- in ---------------------------------------------------------------------------------------------

    def admit(self, messages: Iterable[Any], lease: Lease, now: float, free: int, per_call: float | None) -> list[Work]:
        """The Works to run of one poll: the rest is released now (see the module notes)."""
        assert not self.held, "a poll before the previous batch was acknowledged"
        self.lease, self.states = lease, []
        states: dict[tuple[str, int], PartitionState] = {}
        last: list[Any] = []
        others: list[Any] = []
        for msg in messages:
            if msg.error() is not None:
                self._on_error(msg.error())
                continue
            count = msg.delivery_count()
            self.acquired += 1
            self.deliveries[count or 1] += 1
            (last if last_delivery(count, self.delivery_limit) else others).append(msg)
        kept = keep(len(others), free, lease.deadline - now, per_call, lease.lock_seconds)
        for msg in others[kept:]:
            self._ack(msg, RELEASE)
        if len(others) > kept:
            logger.debug("released %d of %d polled records: more than %d free threads finish within the lock",
                         len(others) - kept, len(others), free)
        works: list[Work] = []
        for msg in last + others[:kept]:
            tp = (msg.topic(), msg.partition())
            state = states.get(tp)
            if state is None:
                state = states[tp] = PartitionState(tp)
                self.states.append(state)
            work = Work(msg, state, msg.offset())
            work.attempts = first_attempt(msg.delivery_count())
            held = self.held[key_of(msg)] = Held(msg, state, last_delivery(msg.delivery_count(), self.delivery_limit))
            if key_of(msg) in self._overdue:  # its first handler still runs here: take its outcome
                held.phase, held.work = WAITING, work
            else:
                works.append(work)
        return works

    # -- out --------------------------------------------------------------------------------------------

    def settle(self, completions: deque[Work]) -> list[Work]:
        """Acknowledge what finished; returns Works to run now (redeliveries whose first handler failed)."""
        again: list[Work] = []
        while completions:
            work = completions.popleft()
            for piece in _singles(work) if work.failed and work.size > 1 else (work,):
                for msg in piece.messages:
                    key = key_of(msg)
                    held = self.held.get(key)
                    if held is None or held.state is not piece.state:
                        self._late(key, piece, again)
                    elif not piece.failed:
                        self._succeeded(key, held, piece)
                    else:
                        self._failed(key, held, piece)
        for work in self.failure.confirmed() if self.failure.pending else ():
            self.failure_confirmed(work)
        if self.outputs is not None and self.outputs.pending:
            for work in self.outputs.confirmed():
                self.written(work)
        return again

    def _succeeded(self, key: Key, held: Held, work: Work) -> None:
        """Success: ACCEPT, once its output records are written (at least once: a record whose lock ends
        first is released, and its redelivery writes them again)."""
        if work.outputs is not None and self.outputs is not None and not self.outputs.write(work):
            held.phase = WRITING
            return
        self._finish(key, held)

    def written(self, work: Work) -> None:
        """A success's output records are confirmed: ACCEPT, unless its lock ended meanwhile."""
        key = key_of(work.message)
        held = self.held.get(key)
        if held is not None and held.state is work.state and held.phase == WRITING:
            self._finish(key, held)

    def failure_confirmed(self, work: Work) -> None:
        """ON_FAILURE finished a record later (its dead letter confirmed): ACCEPT, unless its lock ended."""
        key = key_of(work.message)
        held = self.held.get(key)
        if held is not None and held.state is work.state and held.phase == FAILING:
            self._finish(key, held)

    def _late(self, key: Key, work: Work, again: list[Work]) -> None:
        """An outcome whose lock had ended: a redelivery waiting here takes it, else it is dropped."""
        if key not in self._overdue:
            self.dropped_late += 1
            return
        self._overdue.discard(key)
        twin = self.held.get(key)
        if twin is None or twin.phase != WAITING or twin.work is None:
            self.dropped_late += 1
            return
        if not work.failed:
            self.rejoined += 1
            self._succeeded(key, twin, work)
        elif twin.state.closing:
            self._give_back(key, twin, twin.work)
        else:  # its first handler failed: this delivery runs it (one more attempt)
            twin.phase = QUEUED
            again.append(twin.work)

    def _finish(self, key: Key, held: Held) -> None:
        del self.held[key]
        self._ack(held.message, ACCEPT, held.state)
        self.processed += 1

    def _failed(self, key: Key, held: Held, work: Work) -> None:
        if work.attempts >= self._max_attempts and not work.dropped:
            self._final(key, held, work)
        else:  # its lock leaves no time for a retry here (or it never ran: its batch was retired)
            self._give_back(key, held, work)

    def _final(self, key: Key, held: Held, work: Work) -> None:
        """Out of attempts, or failed on its last delivery: ON_FAILURE decides."""
        work.failed = True
        self.failed += 1
        held.phase = FAILING
        if self.failure.failed(work):
            self._finish(key, held)

    def _give_back(self, key: Key, held: Held, work: Work) -> None:
        """Not finished here and not final: released for another delivery -- unless this is its last one."""
        if held.last:
            if not work.error:
                work.error = NOT_STARTED
            self._final(key, held, work)
            return
        del self.held[key]
        self._ack(held.message, RELEASE)
        if work.attempts > first_attempt(held.message.delivery_count()):
            logger.warning("released %s[%d]@%d after attempt %d of %d: its lock ends before a retry could "
                           "(delivered again, to any member)", key[0], key[1], key[2], work.attempts,
                           self._max_attempts)

    # -- the lease's timers ------------------------------------------------------------------------------

    def retire(self, unstarted: Iterable[Work], waiting: bool = True) -> int:
        """The batch's point of no return: ``unstarted`` (the dispatcher's ``retire``) and, with ``waiting``,
        the redeliveries waiting for a twin are released (or, on their last delivery, given to ON_FAILURE).
        Shutdown keeps the waiting ones while their first handler may still finish within its wait."""
        count = 0
        for work in unstarted:
            held = self.held.get(key_of(work.message))
            if held is not None and held.state is work.state:
                self._give_back(key_of(work.message), held, work)
                count += 1
        for key, held in list(self.held.items()) if waiting else ():
            if held.phase == WAITING and held.work is not None:
                self._give_back(key, held, held.work)
                count += 1
        return count

    def expire(self) -> int:
        """The batch's locks end: release what is still held; returns the handlers still running."""
        running = self.release_all(overdue=True)
        if running:
            self.lock_expired += running
            logger.warning("%d handlers still running when their records' lock (%.0fs) ended: the records go "
                           "back to the group and may be handled twice", running,
                           self.lease.lock_seconds if self.lease is not None else 0.0)
        return running

    def release_all(self, overdue: bool = False) -> int:
        """Release every record still held (the lock ends, or shutdown); returns those with the dispatcher
        (running), remembered as ``overdue`` when asked (a redelivery here then waits for the handler)."""
        for state in self.states:
            state.alive = False  # their outcomes are late from now on; nothing of theirs is retried
        running = 0
        for key, held in list(self.held.items()):
            del self.held[key]
            self._ack(held.message, RELEASE)
            if held.phase == QUEUED:
                running += 1
                if overdue:
                    self._overdue.add(key)
        return running

    # -- acknowledgements --------------------------------------------------------------------------------

    def _ack(self, msg: Any, kind: AcknowledgeType, state: PartitionState | None = None) -> None:
        self._acknowledge(msg, kind)
        if state is not None:  # an acceptance: its answer may say the batch is lost
            self._sent[key_of(msg)] = state
        self.unsent += 1
        if kind is ACCEPT:
            self.accepted += 1
        else:
            self.released += 1

    def on_acks(self, offsets: dict[Any, set[int]], error: KafkaException | None) -> None:
        """The share consumer's acknowledgement callback: the broker's answer for ``offsets``.

        A refused RELEASE only means the lock had ended already. A refused ACCEPT is a duplicate to come
        (the record is delivered again); one of the current batch means its locks are gone -- sent before
        its deadline, so the broker restarted, or this member's share session or membership was lost --
        and :attr:`lost` says so: the engine then drops the rest of the batch (:meth:`lose`).
        """
        refused = 0
        for tp, numbers in offsets.items():
            for offset in numbers:
                state = self._sent.pop((tp.topic, tp.partition, offset), None)
                if error is not None and state is not None:
                    refused += 1
                    if state.alive and any(state is s for s in self.states):
                        self.lost = error.args[0].str() if error.args else str(error)
        if refused:
            self.refused += refused
            logger.warning("the broker refused %d acceptances (%s): they are delivered again", refused,
                           error.args[0].str() if error is not None and error.args else error)

    def lose(self, unstarted: Iterable[Work]) -> int:
        """The current batch's locks are gone (:attr:`lost`): nothing more of it is run or acknowledged as
        this member's; returns the records dropped before they ran (``unstarted``: the dispatcher's retire)."""
        why, self.lost = self.lost, None
        dropped = sum(1 for work in unstarted if key_of(work.message) in self.held)
        running = self.release_all() - dropped
        logger.warning("the current batch's locks are gone (%s): %d of its records not started are dropped, "
                       "%d running finish as duplicates; all are delivered again", why, dropped, running)
        return dropped
