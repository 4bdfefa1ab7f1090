"""ON_FAILURE as policy objects: what happens to a message whose last attempt failed.

The ledger (:meth:`mtc75.engine.ledger.Ledger.settle`) hands every
such message of a live assignment to :meth:`FailurePolicy.failed`, which says whether it is finished
now (its offset may be committed past). A message not finished now either finishes later -- its
dead-letter record confirmed, handed back by :meth:`FailurePolicy.confirmed` -- or never: it is
abandoned in the offset tracker, so revoke and shutdown do not wait for it and the commit stops
below it. A policy that must end the run calls ``fail(error)``; the engine keeps the first error,
stops, and raises it from ``run()``.

- :class:`SkipPolicy` (``skip``): counted, finished, the partition moves on.
- :class:`StopPolicy` (``stop``): abandoned; the run stops with :class:`~mtc75.errors.MessageFailed` (exit 5).
- :class:`DeadLetterPolicy` (``dlq``): published to ``<topic>.dlq``; finished once Kafka confirmed the record.

Each policy tells ``on_error`` (``hook``, a :class:`~mtc75.runtime.failurehook.FailureHook`) the outcome it
decided, when it decides it: ``skipped``, ``stopped``, ``dead_lettered`` once confirmed, and ``abandoned`` for
a dead letter still unconfirmed when the run ends (its message stays uncommitted).

Threads: the poll thread only, like the ledger that calls it (no lock).
"""

from __future__ import annotations

from collections.abc import Callable

from mtc75.core.failures import ABANDONED, DEAD_LETTERED, SKIPPED, STOPPED, FailureOutcome
from mtc75.core.offsets import OffsetTracker
from mtc75.core.work import Work
from mtc75.errors import MessageFailed, Mtc75Error
from mtc75.kafka.deadletter import DeadLetterProducer
from mtc75.runtime.failurehook import FailureHook

Fail = Callable[[Mtc75Error], None]  # the engine's "stop the run with this error" (the first one wins)


class FailurePolicy:
    """Skip's behaviour is the base: every failed message is finished at once."""

    name = "skip"

    def __init__(self) -> None:
        self.skipped = 0  # messages given up after their last attempt
        self.hook: FailureHook | None = None  # on_error, set by the ledger

    def failed(self, work: Work) -> bool:
        """A message of a live assignment failed its last attempt: True when it is finished now."""
        self.skipped += 1
        self._tell(work, SKIPPED)
        return True

    def _tell(self, work: Work, outcome: FailureOutcome) -> None:
        if self.hook is not None:
            self.hook.report(work, outcome)

    @property
    def dead_lettered(self) -> int:
        """Messages whose dead-letter record Kafka confirmed."""
        return 0

    @property
    def pending(self) -> bool:
        """Messages handed over and neither finished nor given up (dead letters awaiting delivery)."""
        return False

    def confirmed(self) -> list[Work]:
        """Messages that finished since the last call (dead letters Kafka confirmed)."""
        return []

    def flush(self, timeout: float) -> list[Work]:
        """At shutdown: finish what is pending within ``timeout``; returns the messages finished."""
        return []

    def close(self) -> None:
        """Release what the policy holds (the dead-letter producer)."""


class SkipPolicy(FailurePolicy):
    """``ON_FAILURE=skip``."""


class StopPolicy(FailurePolicy):
    """``ON_FAILURE=stop``: the message never completes; each partition is committed up to it."""

    name = "stop"

    def __init__(self, tracker: OffsetTracker, fail: Fail) -> None:
        super().__init__()
        self._tracker = tracker
        self._fail = fail

    def failed(self, work: Work) -> bool:
        self._tracker.abandon(work.state, work.offset)  # revoke and shutdown do not wait for it
        self._tell(work, STOPPED)
        msg = work.message
        self._fail(MessageFailed(
            f"{msg.topic()}[{msg.partition()}]@{work.offset} failed {work.attempts} attempts "
            # Another failure below it in the partition (one still waiting for a retry) may hold the
            # commit lower: say what holds for every partition.
            f"({work.error}); ON_FAILURE=stop: each partition committed up to its first unfinished message"
        ))
        return False


class DeadLetterPolicy(FailurePolicy):
    """``ON_FAILURE=dlq``: finished once its record on ``<topic>.dlq`` is confirmed."""

    name = "dlq"

    def __init__(self, letters: DeadLetterProducer, tracker: OffsetTracker, fail: Fail) -> None:
        super().__init__()
        self._letters = letters
        self._tracker = tracker
        self._fail = fail
        self._sent: dict[Work, None] = {}  # published, neither confirmed nor refused (for on_error)

    def failed(self, work: Work) -> bool:
        try:
            self._letters.publish(work)
        except MessageFailed as err:  # can never be dead-lettered: stop, commit below it
            self._tracker.abandon(work.state, work.offset)
            self._letters.take_refused()
            self._tell(work, STOPPED)
            self._fail(err)
            return False
        if self.hook is not None:
            self._sent[work] = None
        return False

    @property
    def dead_lettered(self) -> int:
        return self._letters.delivered

    @property
    def pending(self) -> bool:
        return bool(self._letters.pending)

    def confirmed(self) -> list[Work]:
        if not self._letters.pending:
            return []
        try:
            done = self._letters.poll()
        except MessageFailed as err:
            self._refused()
            self._fail(err)
            return []
        self._told(done)
        return done

    def flush(self, timeout: float) -> list[Work]:
        try:
            done = self._letters.flush(timeout)
        except MessageFailed as err:
            self._refused()
            self._fail(err)
            return []
        self._told(done)
        return done

    def close(self) -> None:
        self._letters.close()
        sent, self._sent = self._sent, {}
        for work in sent:  # unconfirmed at the end: uncommitted, delivered again
            self._tell(work, ABANDONED)

    def _told(self, done: list[Work]) -> None:
        if self._sent:
            for work in done:
                self._sent.pop(work, None)
                self._tell(work, DEAD_LETTERED)

    def _refused(self) -> None:
        """Kafka refused a dead letter for good (the run stops): its message's outcome is ``stopped``."""
        for work in self._letters.take_refused():
            if work in self._sent:
                del self._sent[work]
                self._tell(work, STOPPED)
