"""Retries: what becomes of a Work whose handler raised -- another attempt later, or its last failure.

A raise schedules a retry per :class:`mtc75.core.retry.RetryPolicy` in the dispatcher's delay queue, holding
no worker but keeping its place in the scheduler (not released: an ordered scheduler keeps its lane busy).
After the last attempt the Work is finished failed -- at once for a
:class:`~mtc75.errors.DeserializationError` that is not ``retriable`` (the same bytes fail the same way) -- and
a batch is split instead, each message to run alone (:meth:`mtc75.runtime.batches.Batches.split`). A Work of
an assignment being given up (``state.closing``, set under the same lock) is never retried. With ``on_error`` a
retry is reported (:mod:`mtc75.runtime.failurehook`: queued, never called here) under the lock, before the
retry can run; the poll thread reports the outcomes.

Thread contract: workers call :meth:`Retries.fail` (their shift); it takes the dispatcher's lock. ``count`` is
written under it and read as a hint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mtc75.core.failures import RETRY
from mtc75.core.retry import DelayedWorks, RetryPolicy
from mtc75.core.work import Work
from mtc75.errors import DeserializationError
from mtc75.runtime.batches import Batches
from mtc75.runtime.failurehook import FailureHook
from mtc75.runtime.handlers import describe_error
from mtc75.runtime.invoker import Partial

logger = logging.getLogger("mtc75.runtime.dispatcher")  # the name the handler-failure lines have always had


class Retries:
    """Settles the failures of one dispatcher's Works (see the module notes)."""

    def __init__(
        self, policy: RetryPolicy, lock: threading.Lock, clock: Callable[[], float], delayed: DelayedWorks,
        hook: FailureHook | None, batches: Batches | None, finish: Callable[[Work], None],
    ) -> None:
        self.policy = policy
        self._lock, self._clock, self._delayed, self._hook = lock, clock, delayed, hook
        self._batches = batches  # a batch handler's: a batch's last failure splits it
        self._finish = finish  # a Work done for good
        self.count = 0  # retries scheduled (a message failing 3 times with 3 attempts counts 2)

    def fail(self, work: Work, error: BaseException) -> None:
        """The handler raised ``error`` (any BaseException): schedule a retry, or finish it failed."""
        retry = self.policy
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
            if delay is not None:
                if hook is not None:  # before the retry can run: a message's reports stay in order
                    hook.report(work, RETRY)
                self._delayed.push(now + delay, work)  # not released: an ordered scheduler keeps its lane
                self.count += 1
        if delay is not None:
            logger.warning("handler failed for %s (attempt %d of %d): %s; retrying in %.2fs", what, work.attempts,
                           retry.max_attempts, work.error, delay, exc_info=_traceback(error))
            return
        if live and work.size > 1 and self._batches is not None:
            # A batch failed its last attempt: each message runs alone now, so that a poison message reaches
            # ON_FAILURE alone and the others complete.
            logger.warning("handler failed for %s (attempt %d of %d): %s; each message is tried alone now", what,
                           work.attempts, retry.max_attempts, work.error, exc_info=_traceback(error))
            if hook is not None:
                hook.report(work, RETRY)
            self._batches.split(work, Partial(work.size, [(i, error) for i in range(work.size)]), fresh=True)
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
        self._finish(work)


def _where(work: Work) -> str:
    """``topic[partition]@offset`` of a message, or of a batch's first and last message, for log lines."""
    msg = work.message
    if work.size == 1:
        return f"{msg.topic()}[{msg.partition()}]@{work.offset}"
    return f"a batch of {work.size} of {msg.topic()}[{msg.partition()}]@{work.offset}..{work.offsets[-1]}"


def _retriable(error: BaseException) -> bool:
    """False for a failure that another attempt cannot change: a key or value that does not deserialize."""
    return not isinstance(error, DeserializationError) or error.retriable


def _traceback(error: BaseException) -> tuple[type[BaseException], BaseException, object] | None:
    """The handler's traceback for a DEBUG logger (``exc_info`` outside an ``except`` must be explicit)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return None
    return type(error), error, error.__traceback__
