"""The demo producer: Faker records as JSON, keyed by id so they spread over the partitions."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from faker import Faker

from mtc75.kafka.clients import new_client
from mtc75.kafka.topics import require_topic

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT = 30.0
PROGRESS_INTERVAL = 1.0


class FakeRecords:
    """Makes ``(key, value)`` pairs: a unique increasing ``id`` per run plus Faker fields."""

    def __init__(self, seed: int | None = None) -> None:
        self._faker = Faker()
        if seed is not None:
            self._faker.seed_instance(seed)
        self._next_id = 1
        self.run_id = uuid.uuid4().hex[:8]

    def __call__(self) -> tuple[bytes, bytes]:
        record_id = self._next_id
        self._next_id += 1
        fake = self._faker
        record = {
            "id": record_id,
            "run": self.run_id,
            "name": fake.name(),
            "email": fake.email(),
            "address": fake.address().replace("\n", ", "),
            "company": fake.company(),
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        return str(record_id).encode(), json.dumps(record).encode()


@dataclass
class ProducerStats:
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    elapsed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last_error: str | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed if self.elapsed > 0 else 0.0


def _send(producer: Producer, topic: str, key: bytes, value: bytes, on_delivery: Callable[..., None],
          stop: threading.Event) -> bool:
    """Queue one message, waiting out a full local queue; False if asked to stop meanwhile."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return True
        except BufferError:
            producer.poll(0.1)  # the local queue is full: serve delivery reports, then retry
            if stop.is_set():
                return False


def produce(
    conf: Mapping[str, Any],
    topic: str,
    count: int,
    sleep: float,
    stop: threading.Event,
    on_progress: Callable[[ProducerStats], None] | None = None,
    records: Callable[[], tuple[bytes, bytes]] | None = None,
    rate: float = 0.0,
    progress_interval: float = PROGRESS_INTERVAL,
) -> ProducerStats:
    """Send ``count`` records (0 = until ``stop``), ``sleep`` seconds apart or ``rate`` per second.

    The rate follows a schedule from the start (record n is due at n / rate seconds), so slow
    iterations do not lower the average. Always flushes at the end.
    """
    if rate < 0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    make = records or FakeRecords()
    producer = new_client(Producer, conf, "librdkafka producer")
    require_topic(producer, str(conf.get("bootstrap.servers")), topic)
    stats = ProducerStats()

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            stats.delivered += 1
        else:
            stats.failed += 1
            stats.last_error = err.str()

    next_progress = time.monotonic() + progress_interval
    try:
        while not stop.is_set() and (count == 0 or stats.sent < count):
            key, value = make()
            if not _send(producer, topic, key, value, delivered, stop):
                break
            stats.sent += 1
            producer.poll(0)
            if rate:
                delay = stats.started + stats.sent / rate - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
            elif sleep:
                stop.wait(sleep)
            now = time.monotonic()
            if on_progress is not None and now >= next_progress:
                stats.elapsed = now - stats.started
                on_progress(stats)
                next_progress = now + progress_interval
    finally:
        remaining = producer.flush(FLUSH_TIMEOUT)
        if remaining:
            logger.warning("%d messages still undelivered after %.0fs flush", remaining, FLUSH_TIMEOUT)
            stats.failed += remaining
        stats.elapsed = time.monotonic() - stats.started
    return stats
