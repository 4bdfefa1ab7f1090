"""FETCH_SIZES="auto" against the real broker: the probe's choice per topic shape, and that it leaves no trace.

Each test has its own topic and group; every run is bounded (max_messages / idle_exit, and the
module's timeout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from mtc75.core.fetchsize import LARGE, SMALL
from mtc75.core.stats import Stats
from mtc75.kafka.clients import REAL_FACTORIES
from mtc75.kafka.fetchprobe import PROBE_SECONDS, probe
from mtc75.settings import Settings
from tests.kafka_helpers import BoundConsumer, committed_offsets, end_offsets

pytestmark = pytest.mark.timeout(120)


def produce(bootstrap: str, topic: str, count: int, size: int, compression: str = "none") -> None:
    """``count`` JSON-like records of ``size`` bytes (text that compresses well), all delivered or raise."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": compression})
    for i in range(count):
        head = b'{"id": %d, "name": "Jane Doe", "note": "' % i
        value = head + b"lorem ipsum " * ((size - len(head)) // 12)
        while True:
            try:
                producer.produce(topic, value=value, key=b"%d" % i)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def run(bootstrap: str, topic: str, group: str, count: int | None = None,
        overrides: dict[str, str] | None = None) -> tuple[Stats, list[tuple[int, int]]]:
    """The engine with default settings over ``topic``: ``count`` messages, or until 2 s idle."""
    handled: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(message: Any) -> None:
        with lock:
            handled.append((message.partition(), message.offset()))

    # On a broker just started, committed() answers NOT_COORDINATOR for a few seconds (while
    # __consumer_offsets is created), longer than the probe's 1.5 s: the probe then keeps the small sizes.
    # This waits (bounded) for the group coordinator as any long-lived cluster has it.
    committed_offsets(bootstrap, group, topic)
    settings = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group, ON_FAILURE="skip",
                                  COMMIT_INTERVAL=0.1)
    engine = BoundConsumer(settings, handler, overrides=overrides or {}, max_messages=count,
                           idle_exit=None if count else 2.0)
    return engine.run(), handled


def test_uncompressed_10kb_records_get_large_fetches(bootstrap: str, make_topic: Callable[..., str],
                                                     unique: Callable[[str], str]) -> None:
    topic = make_topic(3)
    produce(bootstrap, topic, 300, 10_000)
    stats, handled = run(bootstrap, topic, unique("g"), 300)
    assert stats.fetch_sizes == str(LARGE)
    assert len(set(handled)) == 300


def test_lz4_small_messages_keep_small_fetches(bootstrap: str, make_topic: Callable[..., str],
                                              unique: Callable[[str], str]) -> None:
    topic = make_topic(3)
    produce(bootstrap, topic, 20_000, 100, "lz4")
    stats, handled = run(bootstrap, topic, unique("g"), 20_000)
    assert stats.fetch_sizes == str(SMALL)
    assert len(set(handled)) == 20_000


def test_a_fetch_size_set_by_the_user_is_kept(bootstrap: str, make_topic: Callable[..., str],
                                             unique: Callable[[str], str]) -> None:
    topic = make_topic(3)
    produce(bootstrap, topic, 300, 10_000)
    stats, handled = run(bootstrap, topic, unique("g"), 300, overrides={"fetch.max.bytes": "4194304"})
    assert stats.fetch_sizes == "set by the user"
    assert len(set(handled)) == 300


def test_an_empty_topic_keeps_the_defaults(bootstrap: str, make_topic: Callable[..., str],
                                                          unique: Callable[[str], str]) -> None:
    topic, group = make_topic(3), unique("g")
    committed_offsets(bootstrap, group, topic)  # the coordinator is up: None below means "nothing to read"
    conf = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group).consumer_config()
    assert probe(REAL_FACTORIES, conf, topic, seconds=PROBE_SECONDS) is None
    stats, handled = run(bootstrap, topic, unique("g"))
    assert stats.fetch_sizes == str(SMALL) and handled == []


def test_the_probe_leaves_committed_offsets_alone_and_the_engine_starts_from_them(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(3), unique("g")
    produce(bootstrap, topic, 600, 10_000)
    ends = end_offsets(bootstrap, topic)
    start = {p: end // 3 for p, end in ends.items()}
    committed_offsets(bootstrap, group, topic)  # waits (bounded) for the coordinator of a just-started broker
    committer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        committer.commit(offsets=[TopicPartition(topic, p, o) for p, o in start.items()], asynchronous=False)
    finally:
        committer.close()
    conf = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group).consumer_config()
    sample = probe(REAL_FACTORIES, conf, topic)
    assert sample is not None and sample.messages > 0
    assert committed_offsets(bootstrap, group, topic) == start  # the probe committed nothing
    expected = {(p, o) for p in ends for o in range(start[p], ends[p])}
    stats, handled = run(bootstrap, topic, group, len(expected))
    assert stats.fetch_sizes == str(LARGE)
    assert sorted(handled) == sorted(expected)  # exactly from the committed offsets, each once
    assert committed_offsets(bootstrap, group, topic) == ends
