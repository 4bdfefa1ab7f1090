"""The dead-letter topic: where a message goes after its last failed attempt (``ON_FAILURE=dlq``).

A dead-lettered message counts as done -- and may be committed past -- only once Kafka confirmed
the DLQ record. A failed publish is retried (the message stays outstanding meanwhile).

A record too large for the DLQ (the original value plus the ``mtc75.*`` headers over
``message.max.bytes`` of the producer, the broker or the topic) would fail the same way on every
restart and stick its partition for good. So it is sent again smaller -- first with the value cut to
``TRUNCATED_VALUE_BYTES``, then without value and original headers -- and carries the header
``mtc75.truncated`` with the original value's size; the full message stays in the source topic at the
offset the headers name. Any other permanent publish error (e.g. not authorized to write the DLQ
topic) stops the consumer with exit 5 naming the offset, rather than drop the message. Used only by
the poll thread: the delivery reports arrive in meth:`DeadLetterProducer.poll`, on the thread that calls it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from mtc75.core.retry import DelayQueue
from mtc75.core.work import Work
from mtc75.errors import MessageFailed
from mtc75.kafka.clients import REAL_FACTORIES, ClientFactories, new_client
from mtc75.kafka.topics import create_topic, fetch_metadata

logger = logging.getLogger(__name__)

SUFFIX = ".dlq"
MAX_ERROR_CHARS = 2000  # the error header is for people: keep a huge message from bloating the record
# Headers added to the original key, value and headers.
H_TOPIC, H_PARTITION, H_OFFSET = "mtc75.original.topic", "mtc75.original.partition", "mtc75.original.offset"
H_ATTEMPTS, H_ERROR = "mtc75.attempts", "mtc75.error"
H_TRUNCATED = "mtc75.truncated"  # on a record sent smaller than the original: the original value's size
TRUNCATED_VALUE_BYTES = 64 * 1024  # first shrink step: far below every default size limit (1 MB)
MAX_KEY_BYTES = 1024  # last shrink step: key cut to this, value and original headers dropped
SIZE_CODES = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)  # local and broker-side


def dlq_topic(topic: str) -> str:
    return topic + SUFFIX


def dlq_headers(work: Work, keep_original: bool = True) -> list[tuple[str, bytes]]:
    """The original headers (unless dropped to fit), then where the message came from and why it failed."""
    msg = work.message
    headers = list(msg.headers() or []) if keep_original else []
    headers += [
        (H_TOPIC, msg.topic().encode()),
        (H_PARTITION, str(msg.partition()).encode()),
        (H_OFFSET, str(work.offset).encode()),
        (H_ATTEMPTS, str(work.attempts).encode()),
        (H_ERROR, work.error[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
    ]
    return headers


class DeadLetterProducer:
    """Publishes failed messages to ``<topic>.dlq`` and hands them back once delivered."""

    def __init__(
        self,
        producer_conf: Mapping[str, Any],
        topic: str,
        retry_delay: float,
        on_error: Callable[[KafkaError], None] | None = None,
        factories: ClientFactories = REAL_FACTORIES,
    ) -> None:
        self.topic = dlq_topic(topic)
        self._conf = dict(producer_conf)
        if on_error is not None:
            self._conf.setdefault("error_cb", on_error)
        self._retry_delay = retry_delay
        self._factories = factories  # builds the producer and the admin client
        self._producer: Any = None
        self._confirmed: deque[Work] = deque()
        self._failed: deque[tuple[Work, KafkaError]] = deque()
        self._republish: DelayQueue[Work] = DelayQueue()
        self._shrink: dict[int, int] = {}  # id(work) -> shrink step (0: as is, 1: value cut, 2: bare)
        self.pending = 0  # messages handed to publish(), neither confirmed nor given up
        self._refused: list[Work] = []  # given up (a MessageFailed raised for each), until take_refused()
        self.delivered = 0
        self.truncated = 0  # records sent smaller than the original to fit the size limit

    def ensure_topic(self, partitions: int, replication_factor: int, admin_conf: Mapping[str, Any]) -> None:
        """Create the DLQ topic (as many partitions as the source) unless it exists.

        Existence is checked first, so a consumer without the right to create topics works with a
        DLQ topic an administrator made.
        """
        admin = new_client(self._factories.admin, admin_conf, "librdkafka admin")
        # A property the producer refuses must be a start-up error, not one at the first failure: build one
        # now and let it go. It is not kept: an idle idempotent producer left open kept the process from
        # exiting after the broker went away (measured: still running 30 s after BROKER_DOWN_TIMEOUT).
        new_client(self._factories.producer, self._conf, "dead-letter producer")
        info = fetch_metadata(admin, str(admin_conf.get("bootstrap.servers")), self.topic).topics.get(self.topic)
        if info is not None and info.error is None and info.partitions:
            return
        if create_topic(admin_conf, self.topic, partitions, replication_factor, admin_factory=self._factories.admin):
            logger.info("created dead-letter topic %s (%d partitions)", self.topic, partitions)

    def publish(self, work: Work) -> None:
        """Send the original key, value and headers with the failure headers added."""
        if self._producer is None:
            self._producer = new_client(self._factories.producer, self._conf, "dead-letter producer")
        self.pending += 1
        try:
            self._send(work)
        except MessageFailed:
            self.pending -= 1  # given up: the caller stops the consumer; nothing stays counted
            raise

    def poll(self, now: float | None = None) -> list[Work]:
        """Serve delivery reports; returns messages whose DLQ record is confirmed (now done)."""
        if self._producer is None:
            return []
        self._producer.poll(0)
        now = time.monotonic() if now is None else now
        while self._failed:
            work, err = self._failed.popleft()
            try:
                self._on_failed(work, err, now)
            except MessageFailed:
                self.pending -= 1
                raise
        for work in self._republish.pop_due(now):
            try:
                self._send(work)
            except MessageFailed:
                self.pending -= 1
                raise
        done = list(self._confirmed)
        self._confirmed.clear()
        for work in done:
            self._shrink.pop(id(work), None)
        self.pending -= len(done)
        self.delivered += len(done)
        return done

    def flush(self, timeout: float) -> list[Work]:
        """Wait (bounded) for outstanding DLQ records; returns the ones confirmed meanwhile."""
        done: list[Work] = []
        deadline = time.monotonic() + timeout
        while self.pending and self._producer is not None:
            done += self.poll()
            remaining = deadline - time.monotonic()
            if not self.pending or remaining <= 0:
                break
            self._producer.flush(min(0.1, remaining))
        return done

    def take_refused(self) -> list[Work]:
        """The messages whose dead letter Kafka refused for good since the last call (each raised MessageFailed)."""
        refused, self._refused = self._refused, []
        return refused

    def close(self) -> None:
        if self._producer is not None and self.pending:
            logger.warning("%d dead-letter records unconfirmed; their messages stay uncommitted", self.pending)
        self._producer = None

    # -- internals ------------------------------------------------------------------------------------

    def _send(self, work: Work) -> None:
        assert self._producer is not None
        msg = work.message

        def report(err: KafkaError | None, _record: Any) -> None:
            if err is None:
                self._confirmed.append(work)
            else:
                self._failed.append((work, err))

        step = self._shrink.get(id(work), 0)
        key, value = msg.key(), msg.value()
        headers = dlq_headers(work, keep_original=step < 2)
        if step:
            headers.append((H_TRUNCATED, str(len(value or b"")).encode()))
            value = value[:TRUNCATED_VALUE_BYTES] if step == 1 and value is not None else None
            if step == 2 and key is not None:
                key = key[:MAX_KEY_BYTES]
        try:
            self._producer.produce(self.topic, key=key, value=value, headers=headers, on_delivery=report)
        except BufferError:
            self._republish.push(time.monotonic() + self._retry_delay, work)
        except KafkaException as err:
            # Refused before it was queued (e.g. over the producer's message.max.bytes): same rules as a
            # failed delivery. Nothing was queued, so nothing else counts it.
            self._on_failed(work, err.args[0], time.monotonic())

    def _on_failed(self, work: Work, err: KafkaError, now: float) -> None:
        where = f"{work.message.topic()}[{work.message.partition()}]@{work.offset}"
        if err.code() in SIZE_CODES and self._shrink.get(id(work), 0) < 2:
            step = self._shrink[id(work)] = self._shrink.get(id(work), 0) + 1
            logger.warning("dead-letter record of %s too large (%s): sending it %s, with header %s",
                           where, err.str(), f"with its value cut to {TRUNCATED_VALUE_BYTES} bytes"
                           if step == 1 else "without value and original headers", H_TRUNCATED)
            if step == 1:
                self.truncated += 1
            self._send(work)
            return
        if err.retriable() or err.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT):
            logger.warning("dead-lettering %s failed: %s; retrying in %.1fs", where, err.str(), self._retry_delay)
            self._republish.push(now + self._retry_delay, work)
            return
        self._shrink.pop(id(work), None)
        self._refused.append(work)
        raise MessageFailed(f"cannot publish {where} to dead-letter topic {self.topic}: {err.str()}")
