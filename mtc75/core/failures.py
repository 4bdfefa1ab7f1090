"""What ``on_error`` is told (``mtc75.Consumer(..., on_error=...)``): a :class:`Failure` per failed attempt of a
message, the last one carrying the message's outcome here.

A message's calls, in order: one ``"retry"`` per failed attempt that another attempt follows, then -- unless it
succeeds on a later attempt -- one *final* call whose ``outcome`` says what became of it: ``"dead_lettered"``
(its dead-letter record confirmed), ``"skipped"``, ``"stopped"`` (``ON_FAILURE=stop``, or a dead letter Kafka
refused: the run ends with :class:`~mtc75.errors.MessageFailed`) or ``"abandoned"`` (given up uncommitted by
a revoke, a shutdown or a fatal error, so delivered again: to the partition's next owner, or the next run). The
final call of a message whose last attempt failed is that attempt's call; one given up between attempts gets
its final call with the last failure it had. Every message of a failing batch gets its own calls.

Pure data: built by the engine's threads, read by the hook's thread (mtc75/runtime/failurehook.py); frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

RETRY = "retry"
DEAD_LETTERED = "dead_lettered"
SKIPPED = "skipped"
STOPPED = "stopped"
ABANDONED = "abandoned"
OUTCOMES = (RETRY, DEAD_LETTERED, SKIPPED, STOPPED, ABANDONED)

FailureOutcome = Literal["retry", "dead_lettered", "skipped", "stopped", "abandoned"]


@dataclass(frozen=True)
class Failure:
    """One failed attempt of one message, or (``final``) what became of a message that did not succeed."""

    message: Any  # the fetched confluent_kafka.Message (its bytes as fetched, also with a deserializer set)
    exception: BaseException  # what the handler (or the deserializer) raised
    attempt: int  # which attempt failed: 1 for the first (a batch's attempts, then the message's own alone)
    outcome: FailureOutcome

    @property
    def final(self) -> bool:
        """True for the message's last call: no other attempt follows."""
        return self.outcome != RETRY
