"""Output records, at least once: what handlers return is produced, and a message is done once Kafka confirmed
every record it returned (``PROCESSING_GUARANTEE=at_least_once``; exactly-once writes them inside the
transaction instead: :mod:`mtc75.engine.transactions`).

The producer is idempotent with ``acks=all`` (:meth:`mtc75.settings.Settings.producer_config`): a retried
send never duplicates or reorders within the run. A record whose delivery failed for a transient reason is
sent again after ``retry_delay`` (its message stays outstanding meanwhile, so the commit stays below it); a
permanent failure (too large, not authorized, unknown topic past the producer's own retries) gives the
message up: ``on_given_up(work, MessageFailed)`` -- the engine then stops with exit 5, committing below it,
as for a dead letter that cannot be written. A crash between a record's delivery and the commit of its
message writes it again on the next run: at least once.

Threads: the poll thread only (:meth:`OutputProducer.write`, :meth:`OutputProducer.confirmed` and the
delivery reports, which librdkafka calls inside this thread's ``poll``/``flush``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException

from mtc75.core.output import Output
from mtc75.core.retry import DelayQueue
from mtc75.core.work import Work
from mtc75.errors import MessageFailed
from mtc75.kafka.clients import REAL_FACTORIES, ClientFactories, new_client

logger = logging.getLogger(__name__)

# Delivery errors worth sending again: the producer's own retries ran out on something that passes.
TRANSIENT = (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError.REQUEST_TIMED_OUT,
             KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
             KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION)


class OutputSink(Protocol):
    """Where the ledger hands a finished Work's output records (poll thread only)."""

    @property
    def pending(self) -> int:
        """Works handed to :meth:`write` whose records are neither confirmed nor given up."""

    def write(self, work: Work) -> bool:
        """Write ``work.outputs``; True when the Work is done now, False when :meth:`confirmed` hands it back."""

    def confirmed(self) -> list[Work]:
        """Works whose every record is confirmed since the last call (done now)."""

    def flush(self, timeout: float) -> list[Work]:
        """At shutdown: wait (bounded) for outstanding records; the Works confirmed meanwhile."""

    def close(self) -> None:
        """Release the producer."""


def produce_args(output: Output) -> dict[str, Any]:
    """``Producer.produce`` keywords for one record (a partition only when the handler named one)."""
    args: dict[str, Any] = {"value": output.value, "key": output.key}
    if output.headers is not None:
        args["headers"] = output.headers
    if output.partition is not None:
        args["partition"] = output.partition
    return args


def where(work: Work) -> str:
    msg = work.message
    return f"{msg.topic()}[{msg.partition()}]@{work.offset}"


class OutputProducer:
    """Produces handlers' output records at least once (see the module notes)."""

    def __init__(
        self,
        producer_conf: Mapping[str, Any],
        retry_delay: float,
        on_given_up: Callable[[Work, MessageFailed], None],
        on_error: Callable[[KafkaError], None] | None = None,
        factories: ClientFactories = REAL_FACTORIES,
    ) -> None:
        self._conf = dict(producer_conf)
        if on_error is not None:
            self._conf.setdefault("error_cb", on_error)
        self._retry_delay = retry_delay
        self._on_given_up = on_given_up
        self._factories = factories
        self._producer: Any = None
        self._left: dict[int, list[Any]] = {}  # id(work) -> [work, records not yet confirmed]
        self._confirmed: deque[Work] = deque()
        self._failed: deque[tuple[Work, Output, KafkaError]] = deque()
        self._again: DelayQueue[tuple[Work, Output]] = DelayQueue()
        self.written = 0  # records confirmed

    @property
    def pending(self) -> int:
        return len(self._left)

    def check(self) -> None:
        """Build a producer now and let it go: a property it refuses is a start-up ConfigError, not a failure at
        the first record (an idle idempotent producer kept open can hold the process at exit, as the DLQ's did)."""
        new_client(self._factories.producer, self._conf, "output producer")

    def write(self, work: Work) -> bool:
        assert work.outputs is not None
        if self._producer is None:
            self._producer = new_client(self._factories.producer, self._conf, "output producer")
        self._left[id(work)] = [work, len(work.outputs)]
        for _offset, output in work.outputs:
            if not self._send(work, output):
                return False
        return False

    def confirmed(self) -> list[Work]:
        if self._producer is None:
            return []
        self._producer.poll(0)
        now = time.monotonic()
        while self._failed:
            work, output, err = self._failed.popleft()
            self._on_failed(work, output, err, now)
        for work, output in self._again.pop_due(now):
            if id(work) in self._left:
                self._send(work, output)
        done = list(self._confirmed)
        self._confirmed.clear()
        return done

    def flush(self, timeout: float) -> list[Work]:
        done: list[Work] = []
        deadline = time.monotonic() + timeout
        while self._left and self._producer is not None:
            done += self.confirmed()
            remaining = deadline - time.monotonic()
            if not self._left or remaining <= 0:
                break
            self._producer.flush(min(0.1, remaining))
        return done

    def close(self) -> None:
        if self._left:
            logger.warning("%d messages' output records unconfirmed; those messages stay uncommitted", len(self._left))
        self._producer = None

    # -- internals ------------------------------------------------------------------------------------

    def _send(self, work: Work, output: Output) -> bool:
        """Queue one record; False when the Work was given up (refused before it was queued)."""

        def report(err: KafkaError | None, _record: Any) -> None:
            if err is not None:
                self._failed.append((work, output, err))
                return
            entry = self._left.get(id(work))
            if entry is None:
                return  # given up meanwhile
            entry[1] -= 1
            self.written += 1
            if entry[1] == 0:
                del self._left[id(work)]
                self._confirmed.append(work)

        try:
            self._producer.produce(output.topic, on_delivery=report, **produce_args(output))
        except BufferError:
            self._again.push(time.monotonic() + self._retry_delay, (work, output))
        except KafkaException as err:  # refused before it was queued (e.g. over message.max.bytes)
            return self._on_failed(work, output, err.args[0], time.monotonic())
        except (TypeError, ValueError) as err:  # a header the client cannot encode
            self._give_up(work, f"cannot write its output to {output.topic}: {err}")
            return False
        return True

    def _on_failed(self, work: Work, output: Output, err: KafkaError, now: float) -> bool:
        if id(work) not in self._left:
            return False
        if err.retriable() or err.code() in TRANSIENT:
            logger.warning("output of %s to %s failed: %s; sending it again in %.1fs", where(work), output.topic,
                           err.str(), self._retry_delay)
            self._again.push(now + self._retry_delay, (work, output))
            return True
        self._give_up(work, f"cannot write its output to {output.topic}: {err.str()}")
        return False

    def _give_up(self, work: Work, why: str) -> None:
        self._left.pop(id(work), None)
        self._on_given_up(work, MessageFailed(f"{where(work)} {why}"))
