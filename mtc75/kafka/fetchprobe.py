"""A short-lived consumer that samples about one fetch of the topics, for the fetch sizes (FETCH_SIZES).

With several topics (a list, a pattern) it samples them together -- the partitions of every topic consumed
now, about ENOUGH_BYTES in all -- since one client's fetch sizes serve them all.

:func:`probe` runs before the engine's own client exists (fetch sizes are fixed for a client's life).
It builds its own ``Consumer`` through :class:`~mtc75.kafka.clients.ClientFactories` (the tests' fake
works), never subscribes, never commits and never joins the group: it ``assign()``s each partition at
the group's committed offset (per ``auto.offset.reset`` when there is none), lets librdkafka fetch
about ENOUGH_BYTES in small responses, pauses, and reads the bytes received and the payload bytes
of the messages in them from librdkafka's statistics (``rx_bytes``: bytes read from the brokers'
sockets, compressed; ``rxmsg_bytes`` / ``rxmsgs``: key + value bytes and count of the messages
fetched; STATISTICS.md, top level). The per-partition
``rxbytes`` will not do: it counts message bytes after decompression.

It is advisory: every failure (no broker, no topic, not authorized) ends it with one debug line and
no sample, and the run goes on with the small sizes; the engine's own client then reports real errors
as before; so does reaching its deadline. Bounded: at most PROBE_SECONDS, plus
KafkaClient.close()'s bound (an ``assign()``-only client has no group to leave: milliseconds here).

Threads: :func:`probe` runs on the caller's thread (the engine's poll thread), and its consumer's
callbacks run inside its own ``consume`` calls, on that thread. Nothing is shared.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from mtc75.core.fetchsize import Sample
from mtc75.core.subscription import Subscription
from mtc75.kafka.client import ErrorKind, KafkaClient, classify
from mtc75.kafka.clients import ClientFactories, new_client

logger = logging.getLogger(__name__)

PROBE_SECONDS = 1.5  # longest the probe may take before the engine's client is built (close aside)
STATS_INTERVAL_MS = 50  # how often librdkafka reports; the probe needs two reports after its pause
# librdkafka's statistics are not one consistent snapshot while fetches arrive: bytes received and
# messages parsed are read at different moments. Measured here on uncompressed 10 KB records (true ratio
# 1.00): 1.33 in one snapshot; with 2 MB responses an lz4 topic of 3.1 read 0.89. So the probe pauses
# its partitions once it has its sample (no fetch in flight after that) and takes the first report
# equal to the one before it. It fetches in small responses, so one that was in flight when it paused
# (bytes counted, messages dropped) under-states the ratio by at most 1/8; a short topic is read whole.
PROBE_FETCH_BYTES = 256 * 1024
PROBE_PARTITION_BYTES = 64 * 1024
ENOUGH_BYTES = 8 * PROBE_FETCH_BYTES
CONSUME_BATCH = 1_000
CONSUME_WAIT = 0.05
# The probe's own client: small fetches, none ahead of what it has consumed (queued.min.messages=1), so
# its memory stays a few MB whatever the topic holds.
PROBE_CONF: Mapping[str, Any] = {
    "fetch.max.bytes": PROBE_FETCH_BYTES, "max.partition.fetch.bytes": PROBE_PARTITION_BYTES,
    "message.max.bytes": PROBE_FETCH_BYTES,  # librdkafka refuses a fetch.max.bytes below it (requests only)
    "queued.min.messages": 1, "statistics.interval.ms": STATS_INTERVAL_MS,
    "enable.auto.commit": False, "enable.auto.offset.store": False, "enable.partition.eof": False,
}
# Callbacks and membership of the engine's client that the probe must not carry.
DROPPED_KEYS = ("on_commit", "error_cb", "stats_cb", "group.instance.id")
EARLIEST = ("earliest", "smallest", "beginning")
# committed() right after a broker started: NOT_COORDINATOR until __consumer_offsets is loaded (seen here)
COORDINATOR_NOT_READY = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                         KafkaError.COORDINATOR_NOT_AVAILABLE)
COORDINATOR_RETRY = 0.1
METADATA_STEP = 0.1
STOPPING = (ErrorKind.FATAL, ErrorKind.BROKERS_DOWN, ErrorKind.REFUSED, ErrorKind.TOPIC_MISSING)


class ProbeFailed(Exception):
    """The probe cannot sample this topic; the caller falls back to the default sizes."""


class _Probe:
    """One probe run: its consumer, the statistics snapshots seen and the first error that ends it."""

    def __init__(self, factories: ClientFactories, conf: Mapping[str, Any], subscription: Subscription,
                 deadline: float) -> None:
        self._subscription = subscription
        self._deadline = deadline
        self._earliest = str(conf.get("auto.offset.reset", "latest")) in EARLIEST
        self.samples: list[Sample] = []
        self._error: KafkaError | None = None
        probe_conf = {k: v for k, v in conf.items() if k not in DROPPED_KEYS}
        probe_conf.update(PROBE_CONF, stats_cb=self._on_stats, error_cb=self._on_error)
        self.consumer = new_client(factories.consumer, probe_conf, "fetch probe consumer")

    def _on_stats(self, raw: str) -> None:
        stats = json.loads(raw)
        self.samples.append(Sample(int(stats.get("rx_bytes", 0)), int(stats.get("rxmsg_bytes", 0)),
                                   int(stats.get("rxmsgs", 0))))

    def _on_error(self, err: KafkaError) -> None:
        if self._error is None and classify(err) in STOPPING:
            self._error = err

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise ProbeFailed("timed out")
        if self._error is not None:
            raise ProbeFailed(self._error.str())
        return left

    def run(self) -> Sample | None:
        todo = self._start_positions()
        if not todo:
            return None  # nothing to read from where the group would start
        # A short topic is read whole. (Offsets overcount the messages of a compacted topic or one with
        # transaction markers; a short one of those runs to the deadline and keeps the small sizes.)
        whole = sum(high - tp.offset for tp, high in todo)
        partitions = [tp for tp, _high in todo]
        self.consumer.assign(partitions)
        while not self.samples or (self.samples[-1].messages < whole and self.samples[-1].wire_bytes < ENOUGH_BYTES):
            self.consumer.consume(CONSUME_BATCH, timeout=min(CONSUME_WAIT, self._left()))
        self.consumer.pause(partitions)
        return self._settled()

    def _settled(self) -> Sample | None:
        """The first report equal to the one before it, taken after the pause: nothing was arriving."""
        first = len(self.samples)
        while len(self.samples) < first + 2 or self.samples[-1] != self.samples[-2]:
            self.consumer.consume(CONSUME_BATCH, timeout=min(CONSUME_WAIT, self._left()))
        last = self.samples[-1]
        return last if last.messages > 0 and last.wire_bytes > 0 else None

    def _start_positions(self) -> list[tuple[TopicPartition, int]]:
        """(partition at its start, its end offset) for each partition with data after where the group starts.

        The start is the group's committed offset, else per auto.offset.reset.
        """
        one = self._subscription.single()
        topics = self._metadata(one).topics
        for name in self._subscription.names:
            metadata = topics.get(name)
            if metadata is None or metadata.error is not None:
                raise ProbeFailed(f"topic {name}: {metadata.error if metadata else 'missing'}")
        partitions = [TopicPartition(name, p) for name in self._subscription.select(topics)
                      if topics[name].error is None for p in sorted(topics[name].partitions)]
        if not partitions:
            return []
        todo = []
        for tp in self._committed(partitions):
            low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                            timeout=self._left())
            # auto.offset.reset=error: the engine's client reports it; the probe reads from the end (nothing)
            start = tp.offset if tp.offset >= low else (low if self._earliest else high)
            if start < high:
                todo.append((TopicPartition(tp.topic, tp.partition, start), high))
        return todo

    def _metadata(self, topic: str | None) -> Any:
        """The topic's metadata (None: the cluster's), asked in short steps so that "all brokers down"
        (error_cb) ends the probe at once rather than after the whole budget: with no broker the run's start
        waits for no probe."""
        while True:
            try:
                return self.consumer.list_topics(topic, timeout=min(METADATA_STEP, self._left()))
            except KafkaException as err:
                if err.args[0].code() != KafkaError._TIMED_OUT:
                    raise
            self.consumer.poll(0)  # serves error_cb; _left() raises once it reported an error

    def _committed(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The group's committed offsets; retried while the coordinator is not ready (a new broker)."""
        while True:
            try:
                return self.consumer.committed(partitions, timeout=self._left())
            except KafkaException as err:
                if err.args[0].code() not in COORDINATOR_NOT_READY:
                    raise
                logger.debug("fetch probe: committed offsets: %s; retrying", err.args[0].str())
                time.sleep(min(COORDINATOR_RETRY, self._left()))


def probe(
    factories: ClientFactories, conf: Mapping[str, Any], topic: str | Subscription, seconds: float = PROBE_SECONDS
) -> Sample | None:
    """One fetch's sample of ``topic`` (a name, or the topics a subscription consumes now) read as the engine
    would start reading it; None if nothing or failed."""
    deadline = time.monotonic() + seconds
    subscription = topic if isinstance(topic, Subscription) else Subscription((topic,))
    try:
        run = _Probe(factories, conf, subscription, deadline)
    except Exception as err:  # advisory: the engine's own client reports a bad configuration
        logger.debug("fetch probe not started: %s", err)
        return None
    try:
        return run.run()
    except Exception as err:  # advisory: broker down, topic missing, refused, timed out -> default sizes
        logger.debug("fetch probe of %s gave up: %s: %s", subscription.describe(), type(err).__name__, err)
        return None
    finally:
        KafkaClient(run.consumer, subscription, cooperative=False).close()

