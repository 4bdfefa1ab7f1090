"""The ledger: fetched messages in as Works, finished Works out as offsets done -- the offset tracker's only writer.

:meth:`Ledger.admit` records each fetched partition run in the offset tracker (:mod:`mtc75.core.offsets`) and
returns the Works to run: one Work per run of consecutive offsets, without the offsets an earlier owner's
offset map says finished (they complete at once, without a handler) and without redeliveries of offsets
already in flight. :meth:`Ledger.settle` applies the completion queue: a success completes its offsets; a
Work that failed its last attempt goes to the ON_FAILURE policy (:mod:`mtc75.engine.failure`), which finishes
it now (``skip``), once its dead-letter record is confirmed (``dlq``) or never (``stop``). A success that
returned output records is done once the output sink says so (:mod:`mtc75.kafka.outputs`: confirmed by
Kafka; exactly-once: produced inside the open transaction, at once); a failed or dropped
Work of an assignment being given up is abandoned (never committed; the next owner reads it again); a
completion of an assignment that ended is dropped as late. ``on_error`` (``hook``) hears ``abandoned`` for each
message given up after a failure (a revoke, a shutdown, a fatal error; the policies tell the other outcomes).

Threads: the poll thread only (no lock), like the tracker it owns.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any

from mtc75.core.failures import ABANDONED
from mtc75.core.offsets import OffsetTracker
from mtc75.core.work import Work
from mtc75.engine.failure import FailurePolicy, SkipPolicy
from mtc75.kafka.outputs import OutputSink
from mtc75.runtime.failurehook import FailureHook, OnError

logger = logging.getLogger(__name__)


class Ledger:
    """The offset tracker plus the counts of what happened to the messages (see the module notes)."""

    def __init__(self, on_error: Callable[[Any], None], on_failure_report: OnError | None = None) -> None:
        self.tracker = OffsetTracker()
        # The user's on_error, on a thread of its own (the engine starts and closes it): told of each failure
        self.hook = FailureHook(on_failure_report) if on_failure_report is not None else None
        self._failure: FailurePolicy = SkipPolicy()
        self._failure.hook = self.hook
        self.outputs: OutputSink | None = None  # where output records go (None outside an engine: not written)
        self._on_error = on_error  # an error event among the fetched messages (it is handed the event)
        self.processed = 0  # finished: handled, skipped or dead-lettered
        self.failed = 0  # failed their last attempt (of a live assignment)
        self.dropped_late = 0  # completions of assignments that ended before they arrived
        self.batching = False  # a batch handler: each completed Work is one call
        self.batches = 0  # its completed calls
        self.admitted_at = 0.0  # when a message was last admitted (monotonic)
        self.progress_at = 0.0  # when a completion last arrived (monotonic)
        self.touched: set[tuple[str, int]] = set()  # partitions that took offsets since the holds last looked

    @property
    def failure(self) -> FailurePolicy:
        """ON_FAILURE (skip until the engine sets it, once Kafka is reached)."""
        return self._failure

    @failure.setter
    def failure(self, policy: FailurePolicy) -> None:
        policy.hook = self.hook
        self._failure = policy

    # -- in -------------------------------------------------------------------------------------------

    def admit(self, messages: list[Any]) -> list[Work]:
        """The Works for fetched ``messages`` (error events go to ``on_error`` in place). Runs per partition
        run, not per message: consume() returns runs of one partition."""
        works: list[Work] = []
        run: list[Any] = []
        topic: str | None = None
        partition = -1
        for msg in messages:
            if msg.error() is not None:
                self._admit(run, works)
                run, topic, partition = [], None, -1
                self._on_error(msg)
                continue
            if msg.partition() != partition or msg.topic() != topic:
                self._admit(run, works)
                run = [msg]
                topic, partition = msg.topic(), msg.partition()
            else:
                run.append(msg)
        self._admit(run, works)
        if works:
            self.admitted_at = time.monotonic()
        return works

    def _admit(self, run: list[Any], works: list[Work]) -> None:
        """Record one partition run in the tracker and append its Works."""
        if not run:
            return
        head = run[0]
        tp = (head.topic(), head.partition())
        state = self.tracker.get(tp)
        if state is None:
            return  # not ours any more (revoked between fetch and now): the current owner reads it
        self.touched.add(tp)
        offsets = [msg.offset() for msg in run]
        admitted = self.tracker.admit_range(state, offsets)
        if admitted is None:
            if state.finished is None:  # the common case: no offset map from an earlier owner
                works.append(Work.chunk(run, state, offsets[0]))
                return
            admitted = [True] * len(offsets)
        skip = self.tracker.skip_finished
        for msg, offset, ok in zip(run, offsets, admitted or repeat(False), strict=False):
            if not ok:  # a redelivery of an offset in flight or done: the running handler covers it
                logger.debug("skipping %s[%d]@%d: already in flight", tp[0], tp[1], offset)
            elif not skip(state, offset):  # else finished under an earlier owner: completed without a handler
                works.append(Work(msg, state, offset))

    # -- out ------------------------------------------------------------------------------------------

    def settle(self, completions: deque[Work]) -> int:
        """Apply finished Works to the watermarks; returns the messages finished now."""
        complete_range = self.tracker.complete_range
        count = 0
        if completions:
            self.progress_at = time.monotonic()
        while completions:
            work = completions.popleft()
            if not work.failed:  # the hot path: the handler returned
                if self.batching:
                    self.batches += 1
                if work.outputs is not None:
                    count += self._write(work)
                    continue
                size = work.size
                if size > 1 and not work.consecutive:  # a batch leaving out other keys' messages
                    count += self._complete_each(work)
                elif complete_range(work.state, work.offset, size):
                    self.processed += size
                    count += size
                else:
                    self.dropped_late += size
                continue
            count += self._settle_failed(work)
        if self.failure.pending:
            for work in self.failure.confirmed():
                count += self.finish(work)
        if self.outputs is not None and self.outputs.pending:
            for work in self.outputs.confirmed():
                count += self._complete(work)
        return count

    def _write(self, work: Work) -> int:
        """A success with output records: done now or once they are written (see the module notes)."""
        if not work.state.alive:  # a late completion: its records are never written
            self.dropped_late += work.size
            return 0
        if self.outputs is None or self.outputs.write(work):
            return self._complete(work)
        return 0

    def _complete(self, work: Work) -> int:
        if work.size > 1 and not work.consecutive:
            return self._complete_each(work)
        if self.tracker.complete_range(work.state, work.offset, work.size):
            self.processed += work.size
            return work.size
        self.dropped_late += work.size
        return 0

    def _settle_failed(self, work: Work) -> int:
        state = work.state
        if not state.alive:  # its assignment ended (a coroutine cancelled at revoke): the next owner runs it
            self.dropped_late += work.size
            if self.hook is not None:
                self.hook.report(work, ABANDONED)
            return 0
        if work.dropped or state.closing:  # given up before or while it ran: redelivered, never committed
            self.abandon([work])
            return 0
        self.failed += 1
        if not self.failure.failed(work):
            return 0  # finishes later (dead letter) or never (stop)
        return self.finish(work)

    def _complete_each(self, work: Work) -> int:
        complete = self.tracker.complete
        if all([complete(work.state, offset) for offset in work.offsets]):
            self.processed += work.size
            return work.size
        self.dropped_late += work.size
        return 0

    def finish(self, work: Work) -> int:
        """Count a failed message finished (skipped, or its dead letter confirmed), unless its assignment ended."""
        if self.tracker.complete(work.state, work.offset):
            self.processed += 1
            return 1
        self.dropped_late += 1
        return 0

    def abandon(self, works: Iterable[Work]) -> int:
        """Works that will not run here (dropped at revoke or shutdown): the watermark stays below them."""
        abandon = self.tracker.abandon
        hook = self.hook
        count = 0
        for work in works:
            for offset in work.offsets:
                abandon(work.state, offset)
            count += work.size
            if hook is not None:  # one that failed before (waiting for its retry): its final report
                hook.report(work, ABANDONED)
        return count

    def flush_failures(self, timeout: float) -> None:
        """At shutdown: give pending dead letters and output records up to ``timeout`` to be confirmed, and
        finish those."""
        deadline = time.monotonic() + timeout
        if self.failure.pending:
            for work in self.failure.flush(timeout):
                self.finish(work)
        if self.outputs is not None and self.outputs.pending:
            for work in self.outputs.flush(max(0.0, deadline - time.monotonic())):
                self._complete(work)

    def close(self) -> None:
        """Release the dead-letter and output producers."""
        self.failure.close()
        if self.outputs is not None:
            self.outputs.close()
