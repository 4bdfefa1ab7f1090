"""The dead-letter topics: where a message goes after its last failed attempt (``ON_FAILURE=dlq``).

Each message goes to the dead-letter topic of its own topic, ``<topic>.dlq`` (several with a list or a pattern
subscription). :class:`DeadLetterTopics` makes sure they exist: at start-up for every topic consumed then; for a
topic that appears later (a pattern's new match), before its first dead letter is sent -- on a helper thread,
each try bounded by ENSURE_TIMEOUT, while the poll thread goes on (the message waits, uncommitted); one that
fails for lack of an answer is tried again with the message's next publish attempt, one refused for good (not
authorized to create it) stops the consumer (exit 5) like any other permanent publish error.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from mtc75.core.retry import DelayQueue
from mtc75.core.subscription import DEAD_LETTER_SUFFIX, dead_letter_topic
from mtc75.core.work import Work
from mtc75.errors import KafkaUnavailable, MessageFailed, Mtc75Error
from mtc75.kafka.clients import REAL_FACTORIES, ClientFactories, new_client
from mtc75.kafka.topics import METADATA_TIMEOUT, create_topic, create_topics, fetch_metadata

logger = logging.getLogger(__name__)

SUFFIX = DEAD_LETTER_SUFFIX
ENSURE_TIMEOUT = 10.0  # longest one try at making a dead-letter topic after start-up takes (on a helper thread)
MAX_ERROR_CHARS = 2000  # the error header is for people: keep a huge message from bloating the record
# Headers added to the original key, value and headers.
H_TOPIC, H_PARTITION, H_OFFSET = "mtc75.original.topic", "mtc75.original.partition", "mtc75.original.offset"
H_ATTEMPTS, H_ERROR = "mtc75.attempts", "mtc75.error"
H_TRUNCATED = "mtc75.truncated"  # on a record sent smaller than the original: the original value's size
TRUNCATED_VALUE_BYTES = 64 * 1024  # first shrink step: far below every default size limit (1 MB)
MAX_KEY_BYTES = 1024  # last shrink step: key cut to this, value and original headers dropped
SIZE_CODES = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)  # local and broker-side


dlq_topic = dead_letter_topic


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


class DeadLetterTopics:
    """The ``<topic>.dlq`` topics known to exist; makes the missing ones (see the module notes). Poll thread; a
    topic made after start-up is made on a helper thread of its own (:class:`_Making`)."""

    def __init__(self, admin_conf: Mapping[str, Any], replication_factor: int,
                 factories: ClientFactories = REAL_FACTORIES) -> None:
        self._admin_conf = dict(admin_conf)
        self._replication = replication_factor
        self._factories = factories
        self._bootstrap = str(admin_conf.get("bootstrap.servers"))
        self.ready: set[str] = set()  # dead-letter topics that exist
        self._making: dict[str, _Making] = {}  # dead-letter topics being made after start-up

    def ensure(self, partitions: Mapping[str, int]) -> None:
        """At start-up: the dead-letter topic of each source topic (as many partitions as it has) unless it
        exists. Existence is checked first, so a consumer without the right to create topics works with
        dead-letter topics an administrator made. Raises the error that stops the start."""
        if not partitions:
            return
        admin = new_client(self._factories.admin, self._admin_conf, "librdkafka admin")
        existing = fetch_metadata(admin, self._bootstrap).topics  # one request, however many topics
        missing = {}
        for source, count in sorted(partitions.items()):
            info = existing.get(dlq_topic(source))
            if not (info is not None and info.error is None and info.partitions):
                missing[dlq_topic(source)] = count
        if missing:  # one request for all of them (a pattern may match many topics)
            created = create_topics(self._admin_conf, missing, self._replication, admin_factory=self._factories.admin)
            for topic in sorted(created):
                logger.info("created dead-letter topic %s (%d partitions)", topic, missing[topic])
        self.ready.update(dlq_topic(source) for source in partitions)

    def make_for(self, source: str, partition: int, wait: float = 0.0) -> bool:
        """Before the first dead letter of ``source`` (a topic that appeared after start-up): True once its
        dead-letter topic exists; False while it is being made, or when the last try got no answer (the next
        call tries again); MessageFailed when it cannot be made.

        The topic is made on a helper thread, so that an admin call to a slow or unreachable cluster (up to
        ENSURE_TIMEOUT) does not hold the poll thread -- and with it every commit. ``wait``: seconds this call
        may wait for it (exactly-once produces the record into the open transaction right after)."""
        topic = dlq_topic(source)
        if topic in self.ready:
            return True
        making = self._making.get(topic)
        if making is None:
            making = self._making[topic] = _Making(lambda: self._make(source, partition, topic), topic)
        if not making.finished.wait(wait):
            return False
        del self._making[topic]
        err = making.error
        if err is None:
            self.ready.add(topic)
            return True
        if isinstance(err, KafkaUnavailable):  # no answer, or a refusal that may pass
            logger.warning("dead-letter topic %s not created yet (%s): trying again", topic, err)
            return False
        if isinstance(err, Mtc75Error):  # refused for good (e.g. not authorized to create topics)
            raise MessageFailed(f"cannot dead-letter a message of {source}: {err}") from None
        raise err  # a bug: as if it had been raised here

    def _make(self, source: str, partition: int, topic: str) -> None:
        """``topic`` exists once this returns (in at most about ENSURE_TIMEOUT seconds); raises why not.
        On a helper thread: it touches nothing of this object but its settings."""
        deadline = time.monotonic() + ENSURE_TIMEOUT
        admin = new_client(self._factories.admin, self._admin_conf, "librdkafka admin")
        info = fetch_metadata(admin, self._bootstrap, source, timeout=ENSURE_TIMEOUT / 4).topics.get(source)
        # as many partitions as the source; a source gone meanwhile: as many as the message shows
        count = len(info.partitions) if info is not None and info.error is None and info.partitions else \
            partition + 1
        info = fetch_metadata(admin, self._bootstrap, topic,
                              timeout=max(0.1, min(METADATA_TIMEOUT, deadline - time.monotonic()))).topics.get(topic)
        exists = info is not None and info.error is None and info.partitions
        if not exists and create_topic(self._admin_conf, topic, count, self._replication,
                                       max(0.1, deadline - time.monotonic()), admin_factory=self._factories.admin):
            logger.info("created dead-letter topic %s (%d partitions)", topic, count)


class _Making:
    """One dead-letter topic being made on its own daemon thread: ``finished`` is set when it exists or the
    try ended, ``error`` says why not. The poll thread reads both only after ``finished``."""

    def __init__(self, make: Callable[[], None], topic: str) -> None:
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._make = make
        threading.Thread(target=self._run, name=f"mtc75-make-{topic}", daemon=True).start()

    def _run(self) -> None:
        try:
            self._make()
        except BaseException as err:  # handed to the poll thread, which decides what it means
            self.error = err
        finally:
            self.finished.set()


class DeadLetterProducer:
    """Publishes each failed message to its topic's ``<topic>.dlq`` and hands it back once delivered.

    ``topics``: makes sure a dead-letter topic exists before its first record (None: they all exist)."""

    def __init__(
        self,
        producer_conf: Mapping[str, Any],
        retry_delay: float,
        on_error: Callable[[KafkaError], None] | None = None,
        factories: ClientFactories = REAL_FACTORIES,
        topics: DeadLetterTopics | None = None,
    ) -> None:
        self.topics = topics
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

    def check_config(self) -> None:
        """A property the producer refuses must be a start-up error, not one at the first failure: build one
        now and let it go. It is not kept: an idle idempotent producer left open kept the process from
        exiting after the broker went away (measured: still running 30 s after BROKER_DOWN_TIMEOUT)."""
        new_client(self._factories.producer, self._conf, "dead-letter producer")

    def publish(self, work: Work) -> None:
        """Send the original key, value and headers with the failure headers added."""
        if self._producer is None:
            self._producer = new_client(self._factories.producer, self._conf, "dead-letter producer")
        self.pending += 1
        try:
            if not self._topic_ready(work):
                self._republish.push(time.monotonic() + self._retry_delay, work)
                return
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
                if not self._topic_ready(work):
                    self._republish.push(now + self._retry_delay, work)
                    continue
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

    def _topic_ready(self, work: Work) -> bool:
        """The message's dead-letter topic exists (made now when it does not; False: not yet, try later)."""
        topics = self.topics
        if topics is None or dlq_topic(work.message.topic()) in topics.ready:
            return True
        return topics.make_for(work.message.topic(), work.message.partition())

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
            self._producer.produce(dlq_topic(msg.topic()), key=key, value=value, headers=headers,
                                   on_delivery=report)
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
        raise MessageFailed(f"cannot publish {where} to dead-letter topic {dlq_topic(work.message.topic())}: "
                            f"{err.str()}")
