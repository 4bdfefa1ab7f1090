"""The dead-letter topic: where a message goes after its last failed attempt (``ON_FAILURE=dlq``).

A dead-lettered message counts as done -- and may be committed past -- only once Kafka confirmed
the DLQ record. A failed publish is retried (the message stays outstanding meanwhile); one that can
never succeed stops the consumer rather than drop the message. Used only by the poll thread: the
delivery reports arrive in :meth:`DeadLetters.poll`, on the thread that calls it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError

from mtc75.clients import REAL_CLIENTS, KafkaClients
from mtc75.dispatcher import Work
from mtc75.errors import MessageFailed
from mtc75.retry import DelayQueue
from mtc75.topics import create_topic, fetch_metadata

logger = logging.getLogger(__name__)

SUFFIX = ".dlq"
MAX_ERROR_CHARS = 2000  # the error header is for people: keep a huge message from bloating the record
# Headers added to the original key, value and headers.
H_TOPIC, H_PARTITION, H_OFFSET = "mtc75.original.topic", "mtc75.original.partition", "mtc75.original.offset"
H_ATTEMPTS, H_ERROR = "mtc75.attempts", "mtc75.error"


def dlq_topic(topic: str) -> str:
    return topic + SUFFIX


def dlq_headers(work: Work) -> list[tuple[str, bytes]]:
    """The original headers, then where the message came from and why it failed."""
    msg = work.message
    headers = list(msg.headers() or [])
    headers += [
        (H_TOPIC, msg.topic().encode()),
        (H_PARTITION, str(msg.partition()).encode()),
        (H_OFFSET, str(work.offset).encode()),
        (H_ATTEMPTS, str(work.attempts).encode()),
        (H_ERROR, work.error[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
    ]
    return headers


class DeadLetters:
    """Publishes failed messages to ``<topic>.dlq`` and hands them back once delivered."""

    def __init__(
        self,
        producer_conf: Mapping[str, Any],
        topic: str,
        retry_delay: float,
        on_error: Callable[[KafkaError], None] | None = None,
        clients: KafkaClients = REAL_CLIENTS,
    ) -> None:
        self.topic = dlq_topic(topic)
        self._conf = dict(producer_conf)
        if on_error is not None:
            self._conf.setdefault("error_cb", on_error)
        self._retry_delay = retry_delay
        self._clients = clients  # builds the producer and the admin client
        self._producer: Any = None
        self._confirmed: deque[Work] = deque()
        self._failed: deque[tuple[Work, KafkaError]] = deque()
        self._republish: DelayQueue[Work] = DelayQueue()
        self.pending = 0  # published or waiting to be republished, not yet confirmed
        self.delivered = 0

    def ensure_topic(self, partitions: int, replication_factor: int, admin_conf: Mapping[str, Any]) -> None:
        """Create the DLQ topic (as many partitions as the source) unless it exists.

        Existence is checked first, so a consumer without the right to create topics works with a
        DLQ topic an administrator made.
        """
        admin = self._clients.admin(dict(admin_conf))
        info = fetch_metadata(admin, str(admin_conf.get("bootstrap.servers")), self.topic).topics.get(self.topic)
        if info is not None and info.error is None and info.partitions:
            return
        if create_topic(admin_conf, self.topic, partitions, replication_factor, admin_factory=self._clients.admin):
            logger.info("created dead-letter topic %s (%d partitions)", self.topic, partitions)

    def publish(self, work: Work) -> None:
        """Send the original key, value and headers with the failure headers added."""
        if self._producer is None:
            self._producer = self._clients.producer(self._conf)
        self.pending += 1
        self._send(work)

    def poll(self, now: float | None = None) -> list[Work]:
        """Serve delivery reports; returns messages whose DLQ record is confirmed (now done)."""
        if self._producer is None:
            return []
        self._producer.poll(0)
        now = time.monotonic() if now is None else now
        while self._failed:
            work, err = self._failed.popleft()
            self._on_failed(work, err, now)
        for work in self._republish.pop_due(now):
            self._send(work)
        done = list(self._confirmed)
        self._confirmed.clear()
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

        try:
            self._producer.produce(
                self.topic, key=msg.key(), value=msg.value(), headers=dlq_headers(work), on_delivery=report
            )
        except BufferError:
            self._republish.push(time.monotonic() + self._retry_delay, work)

    def _on_failed(self, work: Work, err: KafkaError, now: float) -> None:
        where = f"{work.message.topic()}[{work.message.partition()}]@{work.offset}"
        if err.retriable() or err.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT):
            logger.warning("dead-lettering %s failed: %s; retrying in %.1fs", where, err.str(), self._retry_delay)
            self._republish.push(now + self._retry_delay, work)
            return
        self.pending -= 1  # given up: no flush may wait for it (it did, for all of SHUTDOWN_TIMEOUT)
        raise MessageFailed(f"cannot publish {where} to dead-letter topic {self.topic}: {err.str()}")
